"""How the frozen backbone runs in ``features``: PyTorch or onnxruntime, fed uint8 batches;
and the ONNX graphs features and export keep (``kept_graph``).

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
from pipeline.modeling.graphs import joined
from pipeline.modeling.runtime import Runtime
from pipeline.modeling.tensors import tensors_digest
from pipeline.system import memo

log = logging.getLogger(__name__)
ENGINES = ("auto", "torch", "onnxruntime")
OPSET = 18


def torch_to_onnx(
    module: nn.Module, example: torch.Tensor, input_name: str, output_name: str, opset: int
) -> onnx.ModelProto:
    """torch.export → ONNX (dynamo exporter), batch axis dynamic, weights inside the file,
    not optimised: before the exporter's optimiser folds batch norms into convolutions,
    every parameter and buffer is an initializer under its state-dict name, so other
    tensors of the same architecture can be put in (``optimized_with_tensors``)."""
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
            optimize=False,
            external_data=False,
            dynamic_shapes=({0: batch},),
            verbose=False,  # the exporter's progress lines would bury the stage's own log
        )
        return onnx.load(str(out))


def optimized_with_tensors(structure: onnx.ModelProto, module: nn.Module) -> onnx.ModelProto:
    """An unoptimised export (``optimize=False``) with ``module``'s tensors as its
    initializers, by state-dict name, then optimised as the exporter does
    (``onnxscript.optimizer.optimize_ir``): the file a fresh export of ``module`` gives."""
    import onnx_ir as ir
    from onnxscript import optimizer

    model = ir.from_proto(structure)
    state = module.state_dict()
    for name, value in model.graph.initializers.items():
        if name in state:
            array = state[name].detach().cpu().contiguous().numpy().copy()
            value.const_value = ir.tensor(array, name=name)
    optimizer.optimize_ir(model)
    return ir.to_proto(model)


def computes_as(proto: onnx.ModelProto, module: nn.Module, example: torch.Tensor) -> bool:
    """Whether onnxruntime on ``proto`` gives ``module``'s output on a seeded random batch
    shaped like ``example`` (within 1e-4 of its largest value): the check that a kept
    structure with new tensors is the module, not a stale or foreign graph."""
    generator = torch.Generator().manual_seed(0)
    if example.dtype == torch.uint8:
        x = torch.randint(0, 256, tuple(example.shape), dtype=torch.uint8, generator=generator)
    else:
        x = torch.randn(tuple(example.shape), generator=generator)
    with torch.inference_mode():
        expected = module.eval()(x).float().numpy()
    try:
        session = onnx_session(proto)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    except Exception as exc:  # onnxruntime raises its own types for graphs it cannot run
        log.warning("the kept graph does not run (%s)", exc)
        return False
    scale = max(1.0, float(np.abs(expected).max()))
    return got.shape == expected.shape and float(np.abs(got - expected).max()) <= 1e-4 * scale


def graph_key(kind: str, example: torch.Tensor, extra: tuple, detail: list) -> str:
    """A digest of what an exported graph depends on: the example's shape and dtype, the
    exporter's version, ``extra`` (opset, names) and ``detail`` (``content_key``,
    ``structure_key``)."""
    spec = [kind, list(example.shape[1:]), str(example.dtype), torch.__version__]
    spec += [[str(e) for e in extra], *detail]
    return memo.digest(spec)


def content_key(state: dict[str, torch.Tensor], example: torch.Tensor, *extra: object) -> str:
    """The key of a module's graph by its tensors, byte for byte: computed from a state dict
    alone, so a checkpoint's kept graphs are found without building its modules."""
    return graph_key("content", example, extra, [tensors_digest(state)])


def structure_key(module: nn.Module, example: torch.Tensor, *extra: object) -> str:
    """The key of a module's graph by structure: its tensors' names, dtypes and shapes, the
    module tree (its repr) and the versions of the code that traces it."""
    package = type(module).__module__.split(".")[0]
    return graph_key(
        "structure",
        example,
        extra,
        [
            repr(module),
            [(n, str(t.dtype), list(t.shape)) for n, t in module.state_dict().items()],
            [version_of(name) for name in ("onnxscript", "onnx-ir", package)],
        ],
    )


def version_of(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{distribution} {version(distribution)}"
    except PackageNotFoundError:
        return f"{distribution} (not installed)"


def read_graph(path: Path) -> onnx.ModelProto:
    """The graph in ``path``, checked (a file cut short or overwritten fails here)."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto


def write_graph(proto: onnx.ModelProto) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(proto.SerializeToString())


def content_graph(
    state: dict[str, torch.Tensor],
    example: torch.Tensor,
    names: tuple[str, str],
    opset: int,
    cache: Path,
) -> onnx.ModelProto | None:
    """The graph ``kept_graph`` keeps of a module with the tensors ``state``, or None."""
    key = content_key(state, example, opset, *names)
    return memo.Store(cache, memo.GRAPHS).get(key, read_graph)


def kept_graph(
    module: nn.Module,
    example: torch.Tensor,
    names: tuple[str, str],
    opset: int,
    cache: Path,
) -> onnx.ModelProto:
    """``module`` as an optimised ONNX graph, the file a dynamo export gives, kept in the
    memo ``cache`` (``graphs``).

    By content: the same tensors load the same file. By structure: new tensors of a kept
    architecture (a fine-tuned backbone, a new head) go into its unoptimised graph
    (``optimized_with_tensors``, 2 s for Lite0 on two cores against 19 s for an export),
    checked to compute as the module does (``computes_as``); a graph that does not is
    exported again. A damaged file is made again.
    """
    content = content_key(module.state_dict(), example, opset, *names)
    graphs = memo.Store(cache, memo.GRAPHS)
    proto = graphs.get(content, read_graph)
    if proto is not None:
        return proto
    module = module.cpu().eval()
    structures = memo.Store(cache, memo.GRAPH_STRUCTURES)
    structure_id = structure_key(module, example, opset, *names)
    structure = structures.get(structure_id, read_graph)
    if structure is not None:
        proto = optimized_with_tensors(structure, module)
        if not computes_as(proto, module, example):
            log.warning(
                "%s is not %s's graph; exporting it again",
                structures.path(structure_id),
                type(module).__name__,
            )
            structure = None
    if structure is None:
        structure = torch_to_onnx(module, example, *names, opset)
        structures.put(structure_id, write_graph(structure))
        proto = optimized_with_tensors(structure, module)
    graphs.put(content, write_graph(proto))
    return proto


class Normalise(nn.Module):
    """(N, H, W, 3) uint8 RGB → the backbone's (N, 3, H, W) input, normalised as
    ``Preprocessing.normalise`` does, in the same order of operations (x / 255 - mean) / std,
    so features match."""

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


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

    The onnxruntime graph is ``Normalise`` joined to the backbone's graph, both kept in
    ``cache`` (``kept_graph``), so a rerun (a few images added, new augmented views) skips
    the export, and export's graph of the fine-tuned backbone reuses its structure.
    """
    started = time.perf_counter()
    if engine == "torch":
        model = nn.Sequential(Normalise(pre), backbone).eval()
        # Moved outside inference mode: weights made inside it could never be trained again.
        model = model.to(runtime.device, memory_format=torch.channels_last)

        def embed_torch(batch: torch.Tensor) -> np.ndarray:
            with torch.inference_mode(), runtime.autocast():
                feats = model(batch.to(runtime.device, non_blocking=True))
            return feats.float().cpu().numpy()

        return Engine("torch-bf16" if runtime.bf16 else "torch-fp32", embed_torch, 0.0)
    session = onnx_session(backbone_graph_from_uint8(backbone, pre, cache))
    name = session.get_inputs()[0].name

    def embed_onnx(batch: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: batch.numpy()})[0]

    seconds = time.perf_counter() - started
    log.info("features: onnxruntime session ready in %.1f s", seconds)
    return Engine("onnxruntime-fp32", embed_onnx, seconds)


def backbone_graph_from_uint8(
    backbone: nn.Module, pre: Preprocessing, cache: Path
) -> onnx.ModelProto:
    """(N, H, W, 3) uint8 ``images`` → pooled ``features``: ``Normalise`` then the backbone."""
    size = pre.input_size
    normalise = kept_graph(
        Normalise(pre),
        torch.zeros(2, size, size, 3, dtype=torch.uint8),
        ("images", "input"),
        OPSET,
        cache,
    )
    features = kept_graph(
        backbone, torch.zeros(2, 3, size, size), ("input", "features"), OPSET, cache
    )
    return joined(normalise, features, "input", ("normalise/", "backbone/"))


def onnx_session(proto: onnx.ModelProto):
    """``proto`` as an onnxruntime CPU session on all this process's threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
