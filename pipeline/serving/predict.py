"""``python -m pipeline predict``: label images with the exported ONNX model, without torch.

Everything the predictor needs comes from the ONNX file's metadata (classes,
preprocessing, calibration temperature), so it serves any model this pipeline exported.
This module imports only onnxruntime, numpy, Pillow and the standard library (through
``images`` and ``preprocessing``, which import nothing else): it runs where torch is not
installed, and the tests check that by making ``import torch`` fail.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.images import load_rgb
from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import DataError
from pipeline.system.fsutil import IMAGE_SUFFIXES


@dataclass(frozen=True)
class OnnxContract:
    """What an exported model says about itself in its metadata_props."""

    classes: list[str]
    preprocessing: Preprocessing
    temperature: float

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "model") -> OnnxContract:
        """Parse and check the metadata; anything missing or malformed is refused by name."""
        missing = [key for key in ("classes", "preprocessing") if key not in meta]
        if missing:
            raise DataError(
                f"{source}: metadata_props has no {', '.join(map(repr, missing))}; "
                "was it exported by `python -m pipeline export`?"
            )
        try:
            classes = json.loads(meta["classes"])
            preprocessing = Preprocessing.from_dict(json.loads(meta["preprocessing"]))
            temperature = float(meta.get("temperature", "1.0"))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"{source}: malformed metadata_props: {exc}") from None
        if (
            not isinstance(classes, list)
            or not classes
            or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)
        ):
            raise DataError(
                f"{source}: metadata_props 'classes' must be a non-empty JSON list of "
                "distinct non-empty names"
            )
        if not math.isfinite(temperature) or temperature <= 0:
            raise DataError(
                f"{source}: metadata_props 'temperature' must be a positive finite number, "
                f"not {meta.get('temperature')!r}"
            )
        return cls(classes, preprocessing, temperature)


def cpu_session(model: bytes, source: Path, threads: int = 0, spinning: bool = True):
    """An onnxruntime CPU session of the serialized ``model`` (read from ``source``), which
    must be self-contained: the folder for external data is an empty temporary one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory(prefix="no-external-data-") as nowhere:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", nowhere
        )
        try:
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for bad models
            if "external data" in str(exc).lower():
                raise DataError(
                    f"{source}: refers to external data files; only self-contained ONNX "
                    "files are loaded (re-export with `python -m pipeline export`)"
                ) from None
            raise DataError(f"{source}: not a loadable ONNX model: {exc}") from None


class OnnxClassifier:
    """An onnxruntime CPU session plus the contract read from the same file.

    The file is read into memory and handed to onnxruntime as bytes, with the folder for
    external data pointed at an empty temporary folder: a model that refers to external
    data files is refused rather than reading whatever sits beside it or in the working
    directory (our exports are one self-contained file).
    """

    def __init__(self, model_path: Path | str, threads: int = 0, spinning: bool = True) -> None:
        """``spinning=False``: idle worker threads sleep instead of spinning, for a process
        that shares the cores with other work (onnx_check beside its image decoder)."""
        path = Path(model_path)
        try:
            model = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read the model: {exc.strerror}") from None
        self.path = path
        self.session = cpu_session(model, path, threads, spinning)
        self.contract = OnnxContract.from_metadata(
            self.session.get_modelmeta().custom_metadata_map, str(path)
        )
        self.input_name = self.session.get_inputs()[0].name
        self._check_shapes(path)

    def _check_shapes(self, path: Path) -> None:
        """The graph must take this contract's images and give one logit per class."""
        size = self.contract.preprocessing.input_size
        input_shape = self.session.get_inputs()[0].shape
        output_shape = self.session.get_outputs()[0].shape
        wrong_input = len(input_shape) != 4 or any(
            isinstance(actual, int) and actual != expected
            for actual, expected in zip(input_shape[1:], (3, size, size), strict=True)
        )
        if wrong_input:
            raise DataError(
                f"{path}: input shape {input_shape} does not take 3x{size}x{size} images "
                "as its metadata says"
            )
        if isinstance(output_shape[-1], int) and output_shape[-1] != len(self.contract.classes):
            raise DataError(
                f"{path}: the graph gives {output_shape[-1]} logits but the metadata names "
                f"{len(self.contract.classes)} classes"
            )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Softmax of logits / temperature: the calibrated probabilities."""
        z = self.logits(batch).astype(np.float64) / self.contract.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def expand_inputs(inputs: Sequence[str]) -> Iterator[Path]:
    """Files as given; folders walked recursively for image files, in sorted order."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
        else:
            yield path


def top_k(probabilities: np.ndarray, classes: list[str], k: int) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": classes[i], "probability": round(float(probabilities[i]), 6)} for i in order]


def predict(
    model: OnnxClassifier, inputs: Sequence[str], k: int = 5, batch_size: int = 32
) -> Iterator[tuple[Path, list[dict] | None, str | None]]:
    """Yield (path, predictions, None) per readable image, (path, None, error) per bad one."""
    pre = model.contract.preprocessing
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> Iterator[tuple[Path, list[dict], None]]:
        probs = model.probabilities(np.stack([arr for _, arr in pending]))
        for (path, _), row in zip(pending, probs, strict=True):
            yield path, top_k(row, model.contract.classes, k), None
        pending.clear()

    for path in expand_inputs(inputs):
        try:
            pending.append((path, pre(load_rgb(path))))
        except Exception as exc:  # any undecodable file: report it, go on with the rest
            yield from flush() if pending else ()
            yield path, None, f"{type(exc).__name__}: {exc}"
            continue
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def is_registry_ref(model: str) -> bool:
    """``production``, ``registry:ALIAS`` or ``URL#NAME[@ALIAS]``, and no such file."""
    if Path(model).is_file():
        return False
    return model == "production" or model.startswith("registry:") or "#" in model


def main(argv: Sequence[str] | None = None, resolve_model=None) -> int:
    """``resolve_model(reference, cache) -> Path``: how a registry reference becomes a
    local file (``followed.resolve_model``, passed in by ``python -m pipeline``, so the
    stages that import this module do not import the registry)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline predict",
        description="Label images with an exported ONNX model; one JSON line per image.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument(
        "--model",
        default="models/model.onnx",
        help="an ONNX file; or a registry alias: `production` (registry:ALIAS) in the project "
        "(promote.registry of params.yaml), URL#NAME[@ALIAS] anywhere (default: %(default)s)",
    )
    parser.add_argument(
        "--cache", default=None, help="where registry models are kept by sha256 (~/.cache)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores (default)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    if is_registry_ref(args.model) and resolve_model is not None:
        try:
            args.model = str(resolve_model(args.model, args.cache))
        except DataError as exc:  # PipelineError: a registry or params problem
            sys.stderr.write(f"predict: {exc}\n")
            return 2
    if not Path(args.model).is_file():
        sys.stderr.write(
            f"predict: {args.model}: no such model file (run `dvc repro export`)" + "\n"
        )
        return 2
    try:
        model = OnnxClassifier(args.model, args.threads)
    except DataError as exc:
        sys.stderr.write(f"predict: {exc}\n")
        return 2
    failed = seen = 0
    for path, predictions, error in predict(model, args.inputs, args.top_k, args.batch_size):
        seen += 1
        if error is not None:
            failed += 1
            sys.stderr.write(f"predict: {path}: {error}\n")
            continue
        line = json.dumps({"path": str(path), "predictions": predictions}, ensure_ascii=False)
        sys.stdout.write(line + "\n")
    if seen == 0:
        sys.stderr.write("predict: no images found in the given paths\n")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
