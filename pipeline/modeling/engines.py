"""How the frozen backbone runs in ``features``: PyTorch or onnxruntime, fed uint8 batches.

Loader workers only decode and resize (``Preprocessing.resize_crop``); scaling and
normalisation run inside the model, batched and threaded (or on the GPU), instead of
per image in a worker. On a 2-core CPU that per-image normalisation cost as much as the
JPEG decode (1.8 ms of 4.4 ms per Caltech-101 image), and uint8 batches are a quarter of
the bytes to move between processes or to the GPU.

``features.engine: auto`` takes onnxruntime (fp32) on the CPU, where it ran Lite0 2.5x
faster than PyTorch bf16 (186 vs 75 img/s, batch 32, 2 threads) with logits equal to
PyTorch fp32 within 1e-5, and PyTorch (bf16 autocast where native) on CUDA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import ConfigError
from pipeline.modeling.runtime import Runtime
from pipeline.system.diskfull import disk_full_is_an_error
from pipeline.system.fsutil import atomic_path, keep_recent, touch

log = logging.getLogger(__name__)
ENGINES = ("auto", "torch", "onnxruntime")
KEPT_GRAPHS = 4  # kept_export: every fine-tuned backbone is a new graph (13 MB for Lite0)
OPSET = 18


def torch_to_onnx(
    module: nn.Module, example: torch.Tensor, input_name: str, output_name: str, opset: int
) -> onnx.ModelProto:
    """torch.export → ONNX (dynamo exporter), batch axis dynamic, weights inside the file."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        out = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module.eval(),
            (example,),
            str(out),
            input_names=[input_name],
            output_names=[output_name],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            verbose=False,  # the exporter's progress lines would bury the stage's own log
        )
        return onnx.load(str(out))


class FromUInt8(nn.Module):
    """A backbone that takes (N, H, W, 3) uint8 RGB and normalises as ``Preprocessing.normalise``
    does, in the same order of operations (x / 255 - mean) / std, so features match."""

    def __init__(self, backbone: nn.Module, pre: Preprocessing) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.backbone(x)


Embedder = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class Engine:
    """A way to run the frozen backbone: ``name`` is part of the feature-cache key."""

    name: str
    embed: Embedder
    setup_seconds: float


def choose(engine: str, precision: str, runtime: Runtime) -> str:
    """``features.engine`` (with ``features.precision``) → ``torch`` or ``onnxruntime`` here."""
    if engine not in ENGINES:
        raise ConfigError(f"features.engine must be one of {ENGINES}, not {engine!r}")
    if engine == "onnxruntime" and runtime.cuda:
        raise ConfigError(
            "features.engine: onnxruntime runs on the CPU only; with CUDA use auto or torch"
        )
    if engine == "onnxruntime" and precision == "bf16":
        raise ConfigError(
            "features.engine: onnxruntime computes in fp32; set features.precision to fp32 or "
            "auto, or features.engine: torch for bf16"
        )
    if engine == "auto":
        return "torch" if runtime.cuda or precision == "bf16" else "onnxruntime"
    return engine


def build(
    engine: str, backbone: nn.Module, pre: Preprocessing, runtime: Runtime, cache: Path
) -> Engine:
    """The embedder for ``engine`` (``torch`` or ``onnxruntime``), ready to take uint8 batches.

    The onnxruntime graph is kept in ``cache`` under a digest of the backbone's tensors and
    preprocessing, so a rerun (a few images added, new augmented views) skips the export.
    """
    started = time.perf_counter()
    model = FromUInt8(backbone, pre).eval()
    if engine == "torch":
        # Moved outside inference mode: weights made inside it could never be trained again.
        model = model.to(runtime.device, memory_format=torch.channels_last)

        def embed_torch(batch: torch.Tensor) -> np.ndarray:
            with torch.inference_mode(), runtime.autocast():
                feats = model(batch.to(runtime.device, non_blocking=True))
            return feats.float().cpu().numpy()

        return Engine("torch-bf16" if runtime.bf16 else "torch-fp32", embed_torch, 0.0)
    session = onnx_session(model, pre, cache)
    name = session.get_inputs()[0].name

    def embed_onnx(batch: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: batch.numpy()})[0]

    seconds = time.perf_counter() - started
    log.info("features: onnxruntime session ready in %.1f s", seconds)
    return Engine("onnxruntime-fp32", embed_onnx, seconds)


def graph_key(model: nn.Module, pre: Preprocessing, *extra: object) -> str:
    """A digest of everything the exported graph depends on: tensors, preprocessing, exporter
    (and ``extra``: the opset, input and output names where they vary)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([pre.to_dict(), torch.__version__, OPSET], sort_keys=True).encode())
    if extra:
        digest.update(json.dumps([str(e) for e in extra]).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def kept_export(
    module: nn.Module,
    pre: Preprocessing,
    names: tuple[str, str],
    opset: int,
    folder: Path,
) -> onnx.ModelProto:
    """``torch_to_onnx`` of ``module`` on (N, 3, H, W) float32 input, kept in ``folder`` under
    ``graph_key``: the same tensors are exported once (a damaged file is exported again)."""
    graph = folder / f"{graph_key(module, pre, opset, *names)}.onnx"
    if graph.exists():
        try:
            proto = onnx.load(str(graph))
            touch(graph)
            return proto
        except Exception as exc:  # a damaged or cut-short file: protobuf's own errors
            log.warning("%s cannot be loaded (%s); exporting again", graph, exc)
    example = torch.zeros(2, 3, pre.input_size, pre.input_size)
    proto = torch_to_onnx(module.cpu(), example, names[0], names[1], opset)
    with disk_full_is_an_error(graph, "paths.feature_cache"):
        graph.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(graph) as tmp:
            tmp.write_bytes(proto.SerializeToString())
    keep_recent(list(folder.glob("*.onnx")), KEPT_GRAPHS)
    return proto


def onnx_session(model: FromUInt8, pre: Preprocessing, cache: Path):
    """The uint8-input backbone as an onnxruntime CPU session on all this process's threads.

    A cached graph that onnxruntime cannot load (a damaged file) is exported again.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    graph = cache / "engines" / f"{graph_key(model, pre)}.onnx"
    if graph.exists():
        try:
            return ort.InferenceSession(
                graph.read_bytes(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
            log.warning("%s cannot be loaded (%s); exporting the backbone again", graph, exc)
    example = torch.zeros(2, pre.input_size, pre.input_size, 3, dtype=torch.uint8)
    serialized = torch_to_onnx(
        model.cpu(), example, "images", "features", OPSET
    ).SerializeToString()
    with disk_full_is_an_error(graph, "paths.feature_cache"):
        graph.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(graph) as tmp:
            tmp.write_bytes(serialized)
    return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
