"""Stage ``export``: the fine-tuned model → one self-describing ONNX file (+ optional int8).

``models/model.onnx`` takes ``input`` (N, 3, H, W float32, dynamic N) and gives ``logits``.
Its metadata_props carry everything a consumer needs without this project: the classes
in index order, the preprocessing (size, resize policy, mean, std), the temperature
fitted on val, and provenance (backbone, params hash, git commit, test metrics).
``models/labels.json`` and ``models/MODEL_CARD.md`` say the same for people.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch

from pipeline.config import Params, Paths
from pipeline.data.rawstore import RawStore
from pipeline.data.splits import read_split
from pipeline.errors import DataError, PipelineError
from pipeline.modeling.engines import content_graph, kept_graph
from pipeline.modeling.graphs import joined
from pipeline.modeling.model import (
    FEATURES,
    ModelCard,
    load_backbone,
    load_checkpoint,
    load_head,
    part_state,
)
from pipeline.modeling.quantization import INT8_RECIPE, CalibrationImages, quantize_int8
from pipeline.system.fsutil import (
    atomic_path,
    read_json_or_empty,
    remove,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.system.provenance import git_revision, params_sha256

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
INPUT, OUTPUT = "input", "logits"


def contract_metadata(
    card: ModelCard, temperature: float, provenance: dict[str, str]
) -> dict[str, str]:
    """The metadata_props a consumer reads: labels, preprocessing, calibration, provenance."""
    pre = card.preprocessing
    return {
        "classes": json.dumps(card.classes, ensure_ascii=False),
        "input_name": INPUT,
        "output_name": OUTPUT,
        "input_layout": "NCHW float32 RGB, scaled to [0, 1], then (x - mean) / std",
        "input_size": str(pre.input_size),
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "resize": pre.resize,
        "resize_policy": pre.to_dict()["resize_policy"],
        "interpolation": pre.interpolation,
        "preprocessing": json.dumps(pre.to_dict()),
        "temperature": repr(float(temperature)),
        "backbone": card.backbone,
        "weights": card.weights_id,
        **provenance,
    }


def to_onnx(checkpoint: Path, opset: int, cache: Path) -> onnx.ModelProto:
    """The classifier in ``checkpoint`` as ONNX: (N, 3, H, W) float32 ``input`` →
    ``logits``, batch dynamic.

    The backbone's graph and the head's, each kept in ``cache`` (``engines.kept_graph``),
    joined into one. A head-only change (as with ``finetune.epochs: 0``) reuses the
    backbone's file, found by the checkpoint's tensors without building the backbone
    (timm's imports, 2 s); a fine-tuned backbone or a new head goes into its
    architecture's kept graph instead of a fresh export (19 s for Lite0 on two cores).
    onnx_check proves the joined file against the PyTorch model as ever.
    """
    card, data = load_checkpoint(checkpoint)
    size = card.preprocessing.input_size
    example = torch.zeros(2, 3, size, size)
    names = (INPUT, FEATURES)
    backbone = content_graph(
        part_state(data["state_dict"], "backbone"), example, names, opset, cache
    )
    if backbone is None:
        backbone = kept_graph(load_backbone(card, data["state_dict"]), example, names, opset, cache)
    head = kept_graph(
        load_head(card, data["state_dict"]),
        torch.zeros(2, card.head.in_dim),
        (FEATURES, OUTPUT),
        opset,
        cache,
    )
    proto = joined(backbone, head, FEATURES, ("backbone/", "head/"))
    if [i.name for i in proto.graph.input] != [INPUT] or [o.name for o in proto.graph.output] != [
        OUTPUT
    ]:
        raise PipelineError(
            f"exported graph has inputs {[i.name for i in proto.graph.input]} and outputs "
            f"{[o.name for o in proto.graph.output]}; expected [{INPUT!r}] and [{OUTPUT!r}]"
        )
    return proto


def with_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    n_classes = len(json.loads(metadata["classes"]))
    proto.doc_string = f"{metadata['backbone']} classifier, {n_classes} classes: see metadata_props"
    return proto


def save_checked(proto: onnx.ModelProto, path: Path) -> None:
    """Full ONNX check (with shape inference), then an atomic write of one self-contained file."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise PipelineError(f"{path}: the exported graph fails onnx.checker: {exc}") from exc
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)


def calibration_rows(paths: Paths, count: int, seed: int) -> pd.DataFrame:
    """``count`` training images spread evenly over classes (at least one per class): their
    rows of the train split (path, label, sha256)."""
    rows = read_split(paths, "train")
    per_class = max(1, -(-count // rows["label"].nunique()))
    shuffled = rows.sample(frac=1.0, random_state=seed)
    return shuffled.groupby("label", sort=True).head(per_class)


def model_card_markdown(
    card: ModelCard, metadata: dict[str, str], evaluation: dict, paths: Paths, params: Params
) -> str:
    """MODEL_CARD.md: what the model is for, what it was trained on, how well it does."""
    validated = read_json_or_empty(paths.metrics_file("validate"))
    split = read_json_or_empty(paths.metrics_file("split"))
    pre = card.preprocessing
    lines = [
        f"# Model card: {card.backbone} image classifier ({len(card.classes)} classes)",
        "",
        "## Intended use",
        f"Classify an RGB image into one of the {len(card.classes)} classes below. Each "
        "prediction comes with a probability calibrated on the validation split (softmax of "
        "logits / `temperature`).",
        "",
        "## Model",
        f"- Backbone: `{card.backbone}`, pretrained weights `{card.weights_id}`, fine-tuned "
        f"with a `{card.head.type}` head.",
        f"- File: `{paths.onnx.name}` (ONNX opset {params.export.opset}); input `{INPUT}` "
        f"(N, 3, {pre.input_size}, {pre.input_size}) float32, output `{OUTPUT}` (N, "
        f"{len(card.classes)}).",
        f"- Temperature: {float(metadata['temperature']):.4f}.",
        f"- Code: git commit `{metadata['git_commit']}` (uncommitted changes: "
        f"{metadata['git_dirty']}); params sha256 `{metadata['params_sha256']}`.",
        "",
        "## Preprocessing",
        "1. Decode, apply the EXIF orientation, convert to 8-bit RGB (transparency on white).",
        f"2. Resize (`{pre.resize}`): {pre.to_dict()['resize_policy']}; "
        f"{pre.interpolation} interpolation"
        + (f", resize_size {pre.resize_size}." if pre.resize == "center_crop" else "."),
        f"3. Scale to [0, 1], subtract mean {list(pre.mean)}, divide by std {list(pre.std)}, "
        "lay out as CHW.",
        "",
        "## Data",
        f"- Source: `{params.data.source}`"
        + (f" (sha256 `{params.data.sha256}`)" if params.data.sha256 else "")
        + (
            f"; excluded classes: {', '.join(params.data.exclude_classes)}"
            if params.data.exclude_classes
            else ""
        )
        + ".",
    ]
    if validated:
        lines.append(
            f"- Validated images: {validated.get('images', '?')} in "
            f"{validated.get('classes', '?')} classes; quarantined: "
            f"{validated.get('quarantined', '?')}."
        )
    ratios = params.split.ratios
    lines.append(
        f"- Split: stratified train/val/test {ratios.train:g}/{ratios.val:g}/{ratios.test:g}, "
        f"seed {params.split.seed}, near-duplicates kept in one split"
        + (
            f"; images: {', '.join(f'{k} {v}' for k, v in split.get('counts', {}).items())}."
            if isinstance(split.get("counts"), dict)
            else "."
        )
    )
    lines += ["", "## Test metrics", ""]
    if evaluation:
        keys = ["top1", "top5", "mean_per_class_acc", "macro_f1", "ece", "ece_calibrated"]
        lines.append("| model | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for name, scores in evaluation.items():
            cells = [f"{scores[k]:.4f}" if k in scores else "" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    else:
        lines.append("(metrics/evaluate.json was not found when this card was written)")
    lines += [
        "",
        "## Limits",
        "- It only knows the classes below: every image gets one of them, however unrelated.",
        "- Accuracy was measured on a held-out split of the same collection; images from "
        "other cameras, framing or domains may score lower.",
        "- Small classes have few test images, so their per-class figures are noisy "
        f"(see `{paths.per_class_table('finetuned')}`).",
        "",
        "## Classes (index order)",
        "",
        ", ".join(f"{i}: {c}" for i, c in enumerate(card.classes)),
        "",
    ]
    return "\n".join(lines)


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.export
    card = load_checkpoint(paths.model)[0]
    temperature = read_temperature(paths.calibration)
    evaluation = read_evaluation(paths.metrics_file("evaluate"))
    provenance = {
        "params_sha256": params_sha256(params),
        **git_revision(),
        "test_metrics": json.dumps(evaluation["finetuned"], sort_keys=True),
        "producer": "transfer-pipeline export",
    }
    metadata = contract_metadata(card, temperature, provenance)
    proto = with_metadata(to_onnx(paths.model, cfg.opset, paths.memo), metadata)
    save_checked(proto, paths.onnx)
    size_mb = paths.onnx.stat().st_size / 1e6
    log.info("wrote %s (%.1f MB, opset %d)", paths.onnx, size_mb, cfg.opset)
    if cfg.quantize:
        rows = calibration_rows(paths, cfg.calibration_images, params.split.seed)
        calibration = CalibrationImages(
            list(RawStore.open(paths.raw).locate(rows["path"])),
            rows["sha256"].tolist(),
            card.preprocessing,
            INPUT,
        )
        int8 = quantize_int8(paths.onnx, calibration, cfg.calibration_method, FEATURES, paths.memo)
        save_checked(
            with_metadata(int8, {**metadata, "quantization": INT8_RECIPE}), paths.onnx_int8
        )
        log.info("wrote %s (%.1f MB)", paths.onnx_int8, paths.onnx_int8.stat().st_size / 1e6)
    else:
        remove(paths.onnx_int8)  # a stale int8 model must not outlive the switch
    write_json_atomic(paths.labels, card.classes)
    write_text_atomic(
        paths.model_card, model_card_markdown(card, metadata, evaluation, paths, params)
    )
    return {"onnx": str(paths.onnx), "size_mb": size_mb, "classes": len(card.classes)}


def read_evaluate_output(path: Path, *keys: str) -> Any:
    """The value at ``keys`` in a JSON file that evaluate wrote; else a DataError saying why."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        for key in keys:
            value = value[key]
        return value
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: run `dvc repro evaluate` first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: no {'.'.join(keys)} ({exc})") from None


def read_evaluation(path: Path) -> dict:
    """Both models' test metrics; the fine-tuned model's must be there."""
    evaluation = read_evaluate_output(path)
    if not isinstance(evaluation, dict) or "top1" not in evaluation.get("finetuned", {}):
        raise DataError(f"{path}: no finetuned.top1 (run `dvc repro evaluate`)")
    return evaluation


def read_temperature(path: Path) -> float:
    """The fine-tuned model's temperature from evaluate's calibration file."""
    return float(read_evaluate_output(path, "temperature", "finetuned"))


def main(params: Params) -> dict:
    return run(params)
