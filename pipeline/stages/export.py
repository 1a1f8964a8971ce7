"""Stage ``export``: the fine-tuned model → one self-describing ONNX file (+ optional int8).

``models/model.onnx`` takes ``input`` (N, 3, H, W float32, dynamic N) and gives ``logits``.
Its metadata_props carry everything a consumer needs without this project: the classes
in index order, the preprocessing (size, resize policy, mean, std), the temperature
fitted on val, and provenance (backbone, params hash, git commit, test metrics).
``models/labels.json`` and ``models/MODEL_CARD.md`` say the same for people.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from pipeline.config import Params, Paths
from pipeline.data.images import load_rgb
from pipeline.data.preprocessing import Preprocessing
from pipeline.data.splits import read_split
from pipeline.errors import DataError, PipelineError
from pipeline.modeling.engines import joined, kept_graph
from pipeline.modeling.model import Classifier, ModelCard, load_classifier
from pipeline.system.fsutil import (
    atomic_path,
    read_json_or_empty,
    remove,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.system.provenance import git_revision

log = logging.getLogger(__name__)
INPUT, OUTPUT = "input", "logits"
FEATURES = "features"  # the backbone's pooled output, the head's input
INT8_RECIPE = (
    "int8 static QDQ, u8 activations, per-channel weights: the first GEMM ops 8-bit u8, the "
    "other GEMM ops 7-bit s8, depthwise convolutions 8-bit s8 (exact on every x86-64 CPU)"
)


# The sections that shape the exported file; paths, download effort, device and the
# checks that run after export do not. Within them, keys that only say how hard to try
# or let a check pass change no output. The rest are hashed into the file's metadata
# (params_sha256), so dvc.yaml lists exactly these keys as export's params (a test holds
# the two equal): a changed one reruns export and the hash in the file is never stale.
MODEL_SECTIONS = (
    "data",
    "validate",
    "split",
    "model",
    "features",
    "head",
    "finetune",
    "evaluate",
    "export",
)
NOT_HASHED = frozenset({"validate.allow_class_change", "finetune.checkpoint_every_steps"})


def model_params(params: Params) -> dict[str, Any]:
    """The settings that made this model, by dotted key (``split.ratios`` whole)."""
    return {
        f"{section}.{field.name}": getattr(getattr(params, section), field.name)
        for section in MODEL_SECTIONS
        for field in dataclasses.fields(getattr(params, section))
        if f"{section}.{field.name}" not in NOT_HASHED
    }


def params_sha256(params: Params) -> str:
    """A hash of the settings that made this model, to trace a file back to its params."""
    values = {
        key: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        for key, v in model_params(params).items()
    }
    canonical = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


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


def to_onnx(model: Classifier, card: ModelCard, opset: int, cache: Path) -> onnx.ModelProto:
    """The classifier as ONNX: (N, 3, H, W) float32 ``input`` → ``logits``, batch dynamic.

    The backbone's graph and the head's, each kept in ``cache`` (``engines.kept_graph``),
    joined into one. A head-only change (as with ``finetune.epochs: 0``) reuses the
    backbone's file; a fine-tuned backbone or a new head goes into its architecture's kept
    graph instead of a fresh export (19 s for Lite0 on two cores). onnx_check proves the
    joined file against the PyTorch model as ever.
    """
    size = card.preprocessing.input_size
    backbone = kept_graph(
        model.backbone, torch.zeros(2, 3, size, size), (INPUT, FEATURES), opset, cache
    )
    head = kept_graph(
        model.head, torch.zeros(2, card.head.in_dim), (FEATURES, OUTPUT), opset, cache
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


def calibration_rows(paths: Paths, count: int, seed: int) -> list[str]:
    """``count`` training images spread evenly over classes (at least one per class)."""
    rows = read_split(paths, "train")
    per_class = max(1, -(-count // rows["label"].nunique()))
    shuffled = rows.sample(frac=1.0, random_state=seed)
    return shuffled.groupby("label", sort=True).head(per_class)["path"].tolist()


class CalibrationImages:
    """onnxruntime's CalibrationDataReader over preprocessed training images, in batches.

    Every batch has ``batch_size`` images: the last one is filled up with images from the
    start. onnxruntime's histogram calibrators (percentile, entropy) stack the batches'
    outputs and fail on a short last batch; repeating images moves no minimum or maximum.
    """

    def __init__(self, image_paths: list[str], pre: Preprocessing, batch_size: int = 16) -> None:
        self.image_paths, self.pre = image_paths, pre
        self.batch_size = min(batch_size, len(image_paths))
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        paths = self.image_paths
        for start in range(0, len(paths), self.batch_size):
            chunk = (paths[start:] + paths)[: self.batch_size]
            yield {INPUT: np.stack([self.pre(load_rgb(p)) for p in chunk])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_reader(calibration: CalibrationImages):
    """``calibration`` as the CalibrationDataReader that onnxruntime's quantizer takes."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return calibration.get_next()

    return Reader()


# A convolution output channel whose weights all lie below this fraction of its layer's
# largest weight is dead (batch norm folded a near-zero scale into it): its weights move
# its output by less than one activation quantization step (1/255 of the range), but its
# int8 bias scale (input scale x weight scale) would be so small that the bias overflows
# int32 and is clipped. Such weights are set to zero before quantizing; the bias stays.
DEAD_CHANNEL_FRACTION = 1e-4


# The share of GEMM ops, counted from the input, that get exact 8-bit u8×u8 weights
# instead of 7-bit u8×s8 (quantize_int8). Chosen on digits-mini, checked on Caltech-101
# (test images int8 lost / gained against fp32): digits-mini 5/1 at 0 (all 7-bit), 2/1
# at 0.1, 1/0 at 0.2 and 0.3, 3/0 at 0.4; Caltech-101 20/6 at 0, 8/6 at 0.1, 9/5 at 0.2.
# Each op moved to u8×u8 costs speed (its kernel does half the work per instruction).
EXACT_GEMM_FRACTION = 0.1


def grouped(node: onnx.NodeProto) -> bool:
    return any(a.name == "group" and a.i > 1 for a in node.attribute)


def gemm_weights(proto: onnx.ModelProto) -> dict[str, int]:
    """Weights of the ops onnxruntime runs through its u8×s8 GEMM kernels (convolutions that
    are not depthwise, Gemm, MatMul), each with its output-channel axis (as the quantizer
    takes it: 0 for Conv and a transposed Gemm weight, 1 otherwise)."""
    initializers = {init.name for init in proto.graph.initializer}
    weights = {}
    for node in proto.graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if node.op_type == "Conv" and not grouped(node):
            weights[node.input[1]] = 0
        elif node.op_type == "Gemm":
            transposed = any(a.name == "transB" and a.i for a in node.attribute)
            weights[node.input[1]] = 0 if transposed else 1
        elif node.op_type == "MatMul":
            weights[node.input[1]] = 1
    return weights


def zero_dead_channels(proto: onnx.ModelProto, fraction: float = DEAD_CHANNEL_FRACTION) -> int:
    """Zero the weights of dead convolution channels (see DEAD_CHANNEL_FRACTION), in place;
    returns how many channels."""
    from onnx import numpy_helper

    conv_weights = {node.input[1] for node in proto.graph.node if node.op_type == "Conv"}
    zeroed = 0
    for init in proto.graph.initializer:
        if init.name not in conv_weights:
            continue
        weights = numpy_helper.to_array(init)
        largest = np.abs(weights.reshape(weights.shape[0], -1)).max(axis=1)
        dead = largest < fraction * largest.max()
        if dead.any():
            weights = weights.copy()
            weights[dead] = 0
            init.CopyFrom(numpy_helper.from_array(weights, init.name))
            zeroed += int(dead.sum())
    return zeroed


def quantize_int8(fp32_path: Path, calibration: CalibrationImages, method: str) -> onnx.ModelProto:
    """Static int8 that computes the same on every x86-64 CPU, calibrated on training images.

    QDQ, u8 activations, per-channel weights. onnxruntime's u8×s8 GEMM kernels on AVX2
    and on AVX-512 without VNNI sum each pair of products in a saturating int16
    (``vpmaddubsw``); with 8-bit weights a pair can exceed it (255 x 127 x 2 > 32767):
    such a model lost 12 pt of top-1 on an AVX2 CPU that a VNNI CPU did not. So every
    op that runs through GEMM kernels (``gemm_weights``) gets a weight format whose
    arithmetic is exact on every ISA:

    - the first ``EXACT_GEMM_FRACTION`` of them, from the input, 8-bit u8 weights: the
      u8×u8 kernels widen to int16 before multiplying (exact, slower); the early,
      high-resolution layers are where 7 bits cost accuracy;
    - the rest, 7-bit s8 weights (onnxruntime's reduce_range: 255 x 64 x 2 fits int16),
      on the fast u8×s8 kernels;
    - depthwise convolutions 8-bit s8 weights: their kernels widen first on every ISA.

    The logits then agree across ISAs up to float rounding (BENCHMARKS.md: int8 across
    CPUs), and the test suite checks it under emulated AVX2 and SSE4 CPUs.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        model = onnx.load(str(prepared))
        dead = zero_dead_channels(model)
        onnx.save_model(model, str(prepared))
        weights = gemm_weights(model)
        exact = set(list(weights)[: round(EXACT_GEMM_FRACTION * len(weights))])
        overrides = {
            name: [{"quant_type": QuantType.QUInt8, "axis": axis}]
            if name in exact
            else [{"reduce_range": True, "axis": axis}]
            for name, axis in weights.items()
        }
        with contextlib.redirect_stdout(sys.stderr):  # the calibrators print their progress
            quantize_static(
                str(prepared),
                str(quantized),
                quantize_reader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={"TensorQuantOverrides": overrides},
            )
        proto = onnx.load(str(quantized))
    log.info(
        "int8: calibrated on %d training images (%s); GEMM ops: %d with 8-bit u8 weights, %d "
        "with 7-bit s8; depthwise convolutions 8-bit s8; %d dead channels zeroed",
        len(calibration.image_paths),
        method,
        len(exact),
        len(weights) - len(exact),
        dead,
    )
    return proto


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
    model, card, _checkpoint = load_classifier(paths.model)
    temperature = read_temperature(paths.calibration)
    evaluation = read_evaluation(paths.metrics_file("evaluate"))
    provenance = {
        "params_sha256": params_sha256(params),
        **git_revision(),
        "test_metrics": json.dumps(evaluation["finetuned"], sort_keys=True),
        "producer": "transfer-pipeline export",
    }
    metadata = contract_metadata(card, temperature, provenance)
    proto = with_metadata(to_onnx(model, card, cfg.opset, paths.feature_cache), metadata)
    save_checked(proto, paths.onnx)
    size_mb = paths.onnx.stat().st_size / 1e6
    log.info("wrote %s (%.1f MB, opset %d)", paths.onnx, size_mb, cfg.opset)
    if cfg.quantize:
        images = calibration_rows(paths, cfg.calibration_images, params.split.seed)
        calibration = CalibrationImages(images, card.preprocessing)
        int8 = quantize_int8(paths.onnx, calibration, cfg.calibration_method)
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
