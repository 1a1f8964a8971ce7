from __future__ import annotations

from pathlib import Path

import pytest
import sklearn
import torch

from pipeline.data.images import load_rgb
from pipeline.errors import ConfigError, PipelineError
from pipeline.modeling.backbones import BACKBONES, build_backbone, lite0_imagenet_state_dict

SAMPLE_PHOTO = (
    Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
)  # a Chinese temple
PALACE = 698  # ImageNet class index of "palace"


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match="unknown backbone 'resnet5'.*efficientnet_lite0.*resnet50"
    ):
        build_backbone("resnet5", "none")


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("efficientnet_lite0", 1280),
        ("resnet18", 512),
        ("mobilenet_v3_large", 960),
        ("efficientnet_b0", 1280),
    ],
)
def test_random_backbones_give_pooled_features(name, dim):
    backbone = build_backbone(name, "none")
    assert backbone.feature_dim == dim and backbone.weights_id == "random"
    assert backbone.preprocessing.input_size == 224 and len(backbone.blocks) >= 5
    with torch.no_grad():
        assert backbone.module(torch.zeros(2, 3, 224, 224)).shape == (2, dim)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "dim"), [("resnet50", 2048), ("vgg16", 4096)])
def test_seed_backbones(name, dim):
    assert build_backbone(name, "none").feature_dim == dim


def test_shipped_lite0_weights_recognise_a_photo():
    import timm

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    classifier.load_state_dict(lite0_imagenet_state_dict(classifier))
    backbone = build_backbone(
        "efficientnet_lite0", "imagenet", resize="center_crop"
    )  # ImageNet's protocol
    assert (
        backbone.preprocessing.mean == (0.5, 0.5, 0.5) and backbone.preprocessing.resize_size == 256
    )
    x = torch.from_numpy(backbone.preprocessing(load_rgb(SAMPLE_PHOTO)))[None]
    with torch.no_grad():
        logits = classifier.eval()(x)
        features = backbone.module(x)
    assert logits.argmax().item() == PALACE
    # The feature extractor is the same network without its ImageNet classifier.
    assert torch.allclose(classifier.get_classifier()(features), logits, atol=1e-4)


def test_torchvision_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / Path(ResNet18_Weights.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    reference = resnet18().state_dict()
    torch.save(reference, cached)
    backbone = build_backbone("resnet18", "imagenet")
    assert torch.equal(backbone.module.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])

    cached.write_bytes(b"half a download")
    with pytest.raises(PipelineError, match=f"place it at {cached}"):
        build_backbone("resnet18", "imagenet")


def test_registry_names_match_the_readme():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert all(name in readme for name in BACKBONES)
