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
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from pipeline.data.featurestore import save_array
from pipeline.data.inputs_code import inputs_code_digest
from pipeline.data.preprocessing import Preprocessing
from pipeline.modeling.graphs import split
from pipeline.serving.predict import cpu_session
from pipeline.system.cpu import cpu_info
from pipeline.system.diskfull import disk_full_is_an_error
from pipeline.system.fsutil import atomic_path, keep_recent, touch

log = logging.getLogger(__name__)
OUTPUTS = "onnx_outputs"  # under paths.feature_cache: the files' kept backbone outputs
KEPT_OUTPUTS = 16  # two files (fp32, int8) for each of 8 backbones, 9 MB each on Caltech


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
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def load_outputs(folder: Path, images: int) -> np.ndarray | None:
    """The kept backbone output of ``images`` images, or None when missing or damaged."""
    try:
        outputs = np.load(folder / "outputs.npy", allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be used (%s); running the backbone part again", folder, exc)
        return None
    if outputs.ndim < 2 or len(outputs) != images or outputs.dtype != np.float32:
        log.warning(
            "%s holds %s %s; running the backbone part again", folder, outputs.shape, outputs.dtype
        )
        return None
    touch(folder)
    return outputs


def keep_outputs(folder: Path, outputs: np.ndarray) -> None:
    with disk_full_is_an_error(folder, "paths.feature_cache"):
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_array(tmp / "outputs.npy", outputs)
    keep_recent([d for d in folder.parent.iterdir() if d.is_dir()], KEPT_OUTPUTS)
