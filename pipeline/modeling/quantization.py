"""Static int8 for the exported classifier: one recipe that is exact on every x86-64 CPU,
calibrated on training images, with the backbone's calibration kept for the next export.

Calibration is most of an export (9.7 s of 14 s for Lite0 on Caltech-101, two cores):
onnxruntime runs an augmented graph over the calibration images to take each tensor's
range. A head-only change (``finetune.epochs: 0``, a new ``head.lr``) leaves the
backbone and its ranges as they were, so the ranges are taken in two parts, split at the
backbone's output (``split_at``): the backbone's, kept in the cache by a key of its
graph's bytes, the images and everything else that changes them, with its output on
those images; and the head's, taken afresh on that output in milliseconds. The two
parts' ranges are the whole graph's, value for value (a test holds them equal to one
calibration of the joined graph), so a kept calibration quantizes as a fresh one does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from pipeline.data.images import Source, load_rgb
from pipeline.data.inputs_code import inputs_code_digest
from pipeline.data.preprocessing import Preprocessing
from pipeline.modeling.graphs import split
from pipeline.system import memo
from pipeline.system.cpu import cpu_info

log = logging.getLogger(__name__)
INT8_RECIPE = (
    "int8 static QDQ, u8 activations, per-channel weights: the first GEMM ops 8-bit u8, the "
    "other GEMM ops 7-bit s8, depthwise convolutions 8-bit s8 (exact on every x86-64 CPU)"
)


@dataclass(frozen=True)
class CalibrationImages:
    """Preprocessed training images (files or places in the raw store) in batches of
    ``batch_size``, for onnxruntime's calibrators; ``digests`` (the images' sha256, in
    order) say which images they are.

    Every batch has ``batch_size`` images: the last one is filled up with images from the
    start. onnxruntime's histogram calibrators (percentile, entropy) stack the batches'
    outputs and fail on a short last batch; repeating images moves no minimum or maximum.
    """

    image_paths: list[Source]
    digests: list[str]
    pre: Preprocessing
    input_name: str
    batch_size: int = 16

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        paths, size = self.image_paths, min(self.batch_size, len(self.image_paths))
        for start in range(0, len(paths), size):
            chunk = (paths[start:] + paths)[:size]
            yield {self.input_name: np.stack([self.pre(load_rgb(p)) for p in chunk])}


def calibration_reader(batches: Iterator[dict[str, np.ndarray]]):
    """``batches`` as the CalibrationDataReader that onnxruntime's calibrators take."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

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


def calibration_method(method: str):
    """``export.calibration_method`` as onnxruntime's ``CalibrationMethod``."""
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]


def calibrate(model_path: Path, batches: Iterator[dict[str, np.ndarray]], method: str):
    """onnxruntime's ranges (``TensorsData``) of the tensors ``quantize_static`` quantizes
    in ``model_path``, over ``batches``: the calibration ``quantize_static`` runs itself."""
    from onnxruntime.quantization import create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        calibrator = create_calibrator(
            model_path,
            sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # quantize_static's default
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=calibration_method(method),
        )
        with contextlib.redirect_stdout(sys.stderr):  # the calibrators print their progress
            calibrator.collect_data(calibration_reader(batches))
            return calibrator.compute_data()


def calibration_key(backbone: onnx.ModelProto, calibration: CalibrationImages, method: str) -> str:
    """Everything that changes the backbone's ranges: its graph byte for byte, the images
    and their preprocessing (and its code), the batches, the method, onnxruntime's
    version and the CPU's features (its fp32 kernels round differently)."""
    import onnxruntime

    spec = {
        "graph": hashlib.sha256(backbone.SerializeToString()).hexdigest(),
        "images": calibration.digests,
        "preprocessing": calibration.pre.to_dict(),
        "code": inputs_code_digest(),
        "batch_size": calibration.batch_size,
        "method": method,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu_info().features,
    }
    return memo.digest(spec)


def read_calibration(folder: Path):
    """A kept backbone calibration: its ranges, and the backbone's output batch by batch."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    ranges = load_tensors_data(folder / "ranges.json")
    with np.load(folder / "outputs.npz") as kept:
        outputs = [kept[f"batch{i}"] for i in range(len(kept.files))]
    return ranges, outputs


def write_calibration(ranges, outputs: list[np.ndarray]) -> Callable[[Path], None]:
    from onnxruntime.quantization.calibrate import save_tensors_data

    def write(folder: Path) -> None:
        save_tensors_data(ranges, folder / "ranges.json")
        np.savez(folder / "outputs.npz", **{f"batch{i}": o for i, o in enumerate(outputs)})

    return write


def backbone_calibration(path: Path, calibration: CalibrationImages, method: str, output: str):
    """The backbone's ranges over the calibration images, and its ``output`` on each batch
    (computed as the calibrator computes it: no graph optimisations, default threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs: list[np.ndarray] = []

    def recorded() -> Iterator[dict[str, np.ndarray]]:
        for batch in calibration.batches():
            outputs.append(session.run([output], batch)[0])
            yield batch

    return calibrate(path, recorded(), method), outputs


def calibration_ranges(
    prepared: Path, calibration: CalibrationImages, method: str, split_at: str, cache: Path
):
    """The ranges of every tensor to quantize in ``prepared``: the backbone's (up to the
    tensor ``split_at``) kept in ``cache`` or taken now, the head's taken on its output."""
    from onnxruntime.quantization.calibrate import TensorsData

    parts = split(onnx.load(str(prepared)), split_at)
    if parts is None:
        log.warning("int8: no tensor %r in the graph to split at; calibrating it whole", split_at)
        return calibrate(prepared, calibration.batches(), method)
    backbone_part, head_part = parts
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        backbone, head = Path(tmp) / "backbone.onnx", Path(tmp) / "head.onnx"
        onnx.save_model(backbone_part, str(backbone))
        onnx.save_model(head_part, str(head))
        calibrations = memo.Store(cache, memo.CALIBRATIONS)
        key = calibration_key(backbone_part, calibration, method)
        kept = calibrations.get(key, read_calibration)
        if kept is None:
            kept = backbone_calibration(backbone, calibration, method, split_at)
            calibrations.put(key, write_calibration(*kept))
        else:
            log.info("int8: the backbone's calibration was kept (%s)", key)
        backbone_ranges, features = kept
        head_ranges = calibrate(head, ({split_at: f} for f in features), method)
    return TensorsData(
        backbone_ranges.calibration_method, {**head_ranges.data, **backbone_ranges.data}
    )


def prepare(fp32_path: Path, prepared: Path) -> tuple[onnx.ModelProto, int]:
    """``fp32_path`` made ready to quantize into ``prepared``: onnxruntime's pre-processing
    (shape inference, graph optimisation), then dead channels zeroed; returns the graph
    and how many channels."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(prepared))
    model = onnx.load(str(prepared))
    dead = zero_dead_channels(model)
    onnx.save_model(model, str(prepared))
    return model, dead


def quantize_int8(
    fp32_path: Path, calibration: CalibrationImages, method: str, split_at: str, cache: Path
) -> onnx.ModelProto:
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

    The logits then agree across ISAs up to float rounding (BENCHMARKS.md: int8 per
    ISA), and the test suite checks it under emulated AVX2 and SSE4 CPUs. The ranges come
    from ``calibration_ranges`` (the backbone's kept in ``cache``).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        model, dead = prepare(fp32_path, prepared)
        weights = gemm_weights(model)
        exact = set(list(weights)[: round(EXACT_GEMM_FRACTION * len(weights))])
        overrides = {
            name: [{"quant_type": QuantType.QUInt8, "axis": axis}]
            if name in exact
            else [{"reduce_range": True, "axis": axis}]
            for name, axis in weights.items()
        }
        ranges = Path(tmp) / "ranges.json"
        save_tensors_data(
            calibration_ranges(prepared, calibration, method, split_at, cache), ranges
        )
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(  # with the ranges given: it calibrates nothing itself
                str(prepared),
                str(quantized),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibration_method(method),
                extra_options={"TensorQuantOverrides": overrides},
                calibration_cache_path=str(ranges),
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
