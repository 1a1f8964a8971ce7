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
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.images import load_rgb
from pipeline.preprocessing import Preprocessing

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class OnnxContract:
    """What an exported model says about itself in its metadata_props."""

    classes: list[str]
    preprocessing: Preprocessing
    temperature: float

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> OnnxContract:
        try:
            return cls(
                classes=list(json.loads(meta["classes"])),
                preprocessing=Preprocessing.from_dict(json.loads(meta["preprocessing"])),
                temperature=float(meta.get("temperature", "1.0")),
            )
        except KeyError as exc:
            raise ValueError(
                f"metadata_props has no {exc.args[0]!r}; "
                "was it exported by `python -m pipeline export`?"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"unreadable metadata_props: {exc}") from None


class OnnxClassifier:
    """An onnxruntime CPU session plus the contract read from the same file."""

    def __init__(self, model_path: Path | str, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        self.contract = OnnxContract.from_metadata(meta)
        self.input_name = self.session.get_inputs()[0].name

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline predict",
        description="Label images with an exported ONNX model; one JSON line per image.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--model", default="models/model.onnx", help="default: %(default)s")
    parser.add_argument("--top-k", type=int, default=5, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores (default)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    if not Path(args.model).is_file():
        sys.stderr.write(
            f"predict: {args.model}: no such model file (run `dvc repro export`)" + "\n"
        )
        return 2
    try:
        model = OnnxClassifier(args.model, args.threads)
    except Exception as exc:  # onnxruntime raises its own types for unreadable files
        sys.stderr.write(f"predict: {args.model}: cannot load the model: {exc}\n")
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
