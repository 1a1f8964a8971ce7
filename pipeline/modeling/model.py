"""The classifier (backbone + head) and checkpoints that describe themselves.

A checkpoint stores the backbone name, classes, preprocessing, head shape and params
next to the weights, so evaluate and export rebuild the model from the file alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import DataError
from pipeline.modeling.backbones import Backbone, build_backbone
from pipeline.system.fsutil import load_torch_weights, save_torch_atomic


@dataclass(frozen=True)
class HeadSpec:
    type: str  # "mlp" or "linear"
    in_dim: int
    n_classes: int
    hidden: int = 1024
    dropout: float = 0.3


def make_head(spec: HeadSpec) -> nn.Module:
    """``mlp``: the seed's Dense(hidden, ReLU) → Dropout → Dense(classes); ``linear``: one layer."""
    if spec.type == "linear":
        return nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(spec.in_dim, spec.n_classes))
    return nn.Sequential(
        nn.Linear(spec.in_dim, spec.hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(spec.dropout),
        nn.Linear(spec.hidden, spec.n_classes),
    )


class Classifier(nn.Module):
    """Backbone features → head logits; the module fine-tuned, evaluated and exported."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about itself."""

    backbone: str
    weights_id: str
    classes: list[str]
    preprocessing: Preprocessing
    head: HeadSpec

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "weights_id": self.weights_id,
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.to_dict(),
            "head": asdict(self.head),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        return cls(
            data["backbone"],
            data["weights_id"],
            list(data["classes"]),
            Preprocessing.from_dict(data["preprocessing"]),
            HeadSpec(**data["head"]),
        )


def save_checkpoint(path: Path, card: ModelCard, state_dict: dict, **extra: Any) -> None:
    """Write weights and card atomically (an interrupted save leaves the old file)."""
    save_torch_atomic(path, {"card": card.to_dict(), "state_dict": state_dict, **extra})


def load_checkpoint(path: Path) -> tuple[ModelCard, dict]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data, never code."""
    if not path.exists():
        raise DataError(f"{path} does not exist: run the stage that writes it first")
    data = load_torch_weights(path)
    return ModelCard.from_dict(data["card"]), data


def classifier_from_head(backbone: Backbone, card: ModelCard, head_state: dict) -> Classifier:
    head = make_head(card.head)
    head.load_state_dict(head_state)
    return Classifier(backbone.module, head)


# The name of the backbone's pooled output, the head's input, in the exported ONNX graphs:
# export joins the two parts there, and int8 calibration and onnx_check split them there.
FEATURES = "features"


def part_state(state: dict, part: str) -> dict:
    """The tensors of ``part`` (``backbone`` or ``head``) in a classifier's state dict, by
    the part's own names."""
    return {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}


def joined_state(backbone_state: dict, card: ModelCard, head_state: dict) -> dict:
    """``Classifier(backbone, head).state_dict()`` from the parts' state dicts, the head's
    checked against ``card``, without building the backbone (nor importing timm)."""
    head = make_head(card.head)
    head.load_state_dict(head_state)
    return {
        **{f"backbone.{k}": v for k, v in backbone_state.items()},
        **{f"head.{k}": v.detach().cpu() for k, v in head.state_dict().items()},
    }


def load_backbone(card: ModelCard, state: dict) -> nn.Module:
    """The backbone of a classifier's state dict (no ImageNet download)."""
    backbone = build_backbone(card.backbone, "none").module
    backbone.load_state_dict(part_state(state, "backbone"))
    return backbone.eval()


def load_head(card: ModelCard, state: dict) -> nn.Module:
    """The head of a classifier's state dict, built without its backbone (nor timm)."""
    head = make_head(card.head)
    head.load_state_dict(part_state(state, "head"))
    return head.eval()


def load_classifier(path: Path) -> tuple[Classifier, ModelCard, dict]:
    """Rebuild a fine-tuned classifier from its checkpoint alone (no ImageNet download)."""
    card, data = load_checkpoint(path)
    backbone = build_backbone(card.backbone, "none")
    model = Classifier(backbone.module, make_head(card.head))
    model.load_state_dict(data["state_dict"])
    return model.eval(), card, data
