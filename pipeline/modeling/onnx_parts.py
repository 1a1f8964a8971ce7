"""An exported ONNX file as its backbone part and its head part, and the backbone part's
output on the test split kept for the next check of the same backbone.

onnx_check runs both exported files over the whole test split: with the images' decoding
that was 16 s of its 25 s on Caltech-101 (two cores). A head-only change (a new
``head.lr``) leaves the backbone part of both files byte for byte as it was, and so its
output on the same tensors. The check then keeps that output, by a key of the backbone
part's bytes, the images, their preprocessing (and its code), the batches, onnxruntime's
version, its threads and the CPU's features (its kernels round differently), and runs
only the file's head part on it. The whole file still runs on the first batch of the
split, and its logits must equal the parts' bit for bit, or the whole split goes through
the whole file as before. A file without the tensor to split at is checked whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from pipeline.data.featurestore import save_array
from pipeline.data.inputs_code import inputs_code_digest
from pipeline.data.preprocessing import Preprocessing
from pipeline.modeling.graphs import split
from pipeline.serving.predict import cpu_session
from pipeline.system import memo
from pipeline.system.cpu import cpu_info


class OnnxParts:
    """``path`` split at the tensor ``split_at``: a session of the whole file that also
    gives that tensor (``tapped``), and one of the head part alone (``head``)."""

    def __init__(self, path: Path, threads: int, split_at: str) -> None:
        proto = onnx.load(str(path))
        self.path, self.threads, self.split_at = path, threads, split_at
        parts = split(proto, split_at) if len(proto.graph.input) == 1 else None
        self.splittable = parts is not None
        self.backbone_digest = None
        if parts is None:
            return
        backbone, head = parts
        self.backbone_digest = hashlib.sha256(backbone.SerializeToString()).hexdigest()
        self._head_model = head.SerializeToString()
        proto.graph.output.append(backbone.graph.output[0])
        self._tapped_model = proto.SerializeToString()
        self.input_name, self.output_name = proto.graph.input[0].name, proto.graph.output[0].name
        self._tapped = self._head = None

    def tapped(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The whole file's logits on ``batch``, and the backbone part's output."""
        if self._tapped is None:
            self._tapped = cpu_session(self._tapped_model, self.path, self.threads, False)
        logits, features = self._tapped.run(
            [self.output_name, self.split_at], {self.input_name: batch}
        )
        return logits, features

    def head(self, features: np.ndarray) -> np.ndarray:
        """The head part's logits on the backbone part's output."""
        if self._head is None:
            self._head = cpu_session(self._head_model, self.path, self.threads, False)
        return self._head.run([self.output_name], {self.split_at: features})[0]

    def outputs_key(self, digests: Sequence[str], batch_size: int, pre: Preprocessing) -> str:
        """Everything that changes the backbone part's output on these images."""
        import onnxruntime

        spec = {
            "backbone": self.backbone_digest,
            "images": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
            "batch_size": batch_size,
            "preprocessing": pre.to_dict(),
            "code": inputs_code_digest(),
            "onnxruntime": onnxruntime.__version__,
            "threads": self.threads,
            "cpu": cpu_info().features,
        }
        return memo.digest(spec)


def load_outputs(cache: Path, key: str, images: int) -> np.ndarray | None:
    """The kept backbone output of ``images`` images under ``key`` in the memo ``cache``,
    or None when missing or damaged."""

    def read(folder: Path) -> np.ndarray:
        outputs = np.load(folder / "outputs.npy", allow_pickle=False)
        if outputs.ndim < 2 or len(outputs) != images or outputs.dtype != np.float32:
            raise ValueError(f"it holds {outputs.shape} {outputs.dtype}, not {images} rows")
        return outputs

    return memo.Store(cache, memo.ONNX_OUTPUTS).get(key, read)


def keep_outputs(cache: Path, key: str, outputs: np.ndarray) -> None:
    memo.Store(cache, memo.ONNX_OUTPUTS).put(
        key, lambda tmp: save_array(tmp / "outputs.npy", outputs)
    )
