"""Unsafe loading (#7 item 5) and device faults (item 6): hostile model files never run
code, malformed ONNX files are refused by name, and a missing GPU is handled as asked.

Every hostile file here is real: a torch file whose pickle would create a sentinel file,
an ONNX model whose weights sit in an external data file planted in the working
directory, ONNX models with broken metadata. The sentinel never appearing is the proof.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.data.preprocessing import Preprocessing
from pipeline.errors import DataError, PipelineError
from pipeline.serving.predict import OnnxClassifier
from tests.support.faults import record
from tests.support.images import create_image_folder
from tests.support.project import REPO_ROOT

pytestmark = pytest.mark.faults

PREPROCESSING = Preprocessing(8, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="squash")


class _Payload:
    """Unpickling this creates ``sentinel``: what a malicious checkpoint would do."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def hostile_torch_file(path: Path, sentinel: Path, wrap=lambda payload: payload) -> Path:
    """A genuine torch.save file whose unpickling would run code (open(sentinel, 'w'))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(_Payload(sentinel)), path)
    assert not sentinel.exists()
    return path


def test_hostile_checkpoints_never_run_their_payload(tmp_path, workspace, monkeypatch):
    """Each place a torch file is read: stage checkpoints and the torch hub cache."""
    from pipeline.modeling.backbones import build_backbone
    from pipeline.modeling.model import load_checkpoint

    sentinel = tmp_path / "PWNED"
    cases = 0
    refused = 0

    # 1. A stage checkpoint (models/head.pt, models/model.pt, ...) replaced by a payload,
    #    bare and nested inside an innocent-looking checkpoint dict.
    for name, wrap in [
        ("bare.pt", lambda p: p),
        ("nested.pt", lambda p: {"card": {}, "state_dict": {"w": torch.zeros(2)}, "x": p}),
    ]:
        cases += 1
        path = hostile_torch_file(tmp_path / name, sentinel, wrap)
        with pytest.raises(
            DataError,
            match=rf"{name}: refused to load: it is not a weights-only torch file \(Unsupported "
            r"global: GLOBAL io.open was not an allowed global by default\)",
        ):
            load_checkpoint(path)
        refused += not sentinel.exists()

    # 2. The torch hub cache: a torchvision backbone whose cached weights were replaced.
    #    torch.hub's loader defaults to weights_only=False and never re-hashes a cached file.
    cases += 1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    from torchvision.models import ResNet18_Weights

    cached = (
        tmp_path / "torch-home" / "hub" / "checkpoints" / Path(ResNet18_Weights.DEFAULT.url).name
    )
    hostile_torch_file(cached, sentinel, lambda p: {"conv1.weight": p})
    with pytest.raises(PipelineError, match="cannot load ImageNet weights for resnet18"):
        build_backbone("resnet18", "imagenet")
    refused += not sentinel.exists()

    # 3. Not a torch file at all.
    cases += 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(DataError, match=r"garbage.pt: (refused to load|not a readable torch file)"):
        load_checkpoint(garbage)
    refused += 1

    record("unsafe load: torch file carrying a pickle payload", cases, refused)
    assert not sentinel.exists()
    assert refused == cases


def _functions_called(tree: ast.AST, dotted: str) -> list[ast.Call]:
    owner, _, attr = dotted.rpartition(".")
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attr
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == owner
    ]


def test_no_code_path_unpickles():
    """Static check over the product code: every torch.load is weights-only, nothing else
    unpickles (pickle/joblib/pandas pickles, numpy with allow_pickle)."""
    problems = []
    for source in sorted((REPO_ROOT / "pipeline").glob("*.py")) + sorted(
        (REPO_ROOT / "flows").glob("*.py")
    ):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for call in _functions_called(tree, "torch.load"):
            weights_only = [k for k in call.keywords if k.arg == "weights_only"]
            if not weights_only or getattr(weights_only[0].value, "value", None) is not True:
                problems.append(
                    f"{source.name}:{call.lineno}: torch.load without weights_only=True"
                )
        for dotted in ("pickle.load", "pickle.loads", "joblib.load", "pd.read_pickle"):
            problems += [
                f"{source.name}:{c.lineno}: {dotted}" for c in _functions_called(tree, dotted)
            ]
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "weights_only"):
                if getattr(node.value, "value", None) is not (node.arg == "weights_only"):
                    problems.append(
                        f"{source.name}:{node.value.lineno}: {node.arg}={ast.unparse(node.value)}"
                    )
    assert problems == []


def test_memo_shard_with_pickled_objects_is_not_unpickled(tmp_path, caplog):
    """A kept embeddings shard holding an object array is refused by numpy
    (allow_pickle=False): the memo warns naming it, drops it, and its images count as not
    kept (they are computed again)."""
    from pipeline.data.featurestore import FeatureCache

    sentinel = tmp_path / "PWNED"
    cache = FeatureCache(tmp_path / "memo", "key")
    cache.folder.mkdir(parents=True)
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(sentinel)
    shard = cache.folder / "shard-1-evil.npz"
    np.savez(shard, sha256=np.array(["a" * 64]), features=payload)
    assert cache.load() == {}
    assert f"{shard} cannot be used" in caplog.text and "allow_pickle" in caplog.text
    assert not shard.exists() and not sentinel.exists()


# ---- ONNX ---------------------------------------------------------------------------------


def tiny_onnx(
    classes: int = 3, metadata: dict[str, str] | None = None, size: int = 8
) -> onnx.ModelProto:
    """images [N, 3, size, size] → mean over H, W → MatMul → logits [N, classes]."""
    weights = numpy_helper.from_array(
        np.arange(3 * classes, dtype=np.float32).reshape(3, classes), "W"
    )
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["images", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [weights, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if metadata is None:
        metadata = good_metadata(classes)
    helper.set_model_props(model, metadata)
    return model


def good_metadata(classes: int = 3) -> dict[str, str]:
    return {
        "classes": json.dumps([f"class{i}" for i in range(classes)]),
        "preprocessing": json.dumps(PREPROCESSING.to_dict()),
        "temperature": "1.5",
    }


def test_a_well_formed_tiny_model_loads(tmp_path):
    path = tmp_path / "ok.onnx"
    onnx.save(tiny_onnx(), str(path))
    model = OnnxClassifier(path, threads=1)
    assert model.contract.classes == ["class0", "class1", "class2"]
    assert model.contract.temperature == 1.5
    probabilities = model.probabilities(np.ones((2, 3, 8, 8), np.float32))
    assert probabilities.shape == (2, 3) and np.allclose(probabilities.sum(1), 1.0)


def test_onnx_with_external_data_is_refused_even_with_the_data_planted(tmp_path, monkeypatch):
    """From bytes, onnxruntime would read external data from the working directory; the
    predictor points it at an empty folder, so a planted weights file is never read."""
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save_model(
        tiny_onnx(),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    monkeypatch.chdir(folder)  # weights.bin is beside the model and in the working directory
    with pytest.raises(DataError, match="model.onnx: refers to external data files"):
        OnnxClassifier(folder / "model.onnx")


def _bad_metadata_cases() -> dict[str, tuple[onnx.ModelProto, str]]:
    good = good_metadata()

    def with_(**changes):
        meta = {**good, **changes}
        return tiny_onnx(metadata={k: v for k, v in meta.items() if v is not None})

    pre = PREPROCESSING.to_dict()
    return {
        "no classes": (with_(classes=None), "metadata_props has no 'classes'"),
        "no preprocessing": (with_(preprocessing=None), "metadata_props has no 'preprocessing'"),
        "classes not JSON": (with_(classes="cat,dog,bird"), "malformed metadata_props"),
        "classes not a list": (
            with_(classes='{"a": 1}'),
            "'classes' must be a non-empty JSON list",
        ),
        "duplicate classes": (
            with_(classes='["a", "a", "b"]'),
            "'classes' must be a non-empty JSON list",
        ),
        "empty class name": (
            with_(classes='["a", "", "b"]'),
            "'classes' must be a non-empty JSON list",
        ),
        "class count vs logits": (
            with_(classes='["a", "b"]'),
            "the graph gives 3 logits but the metadata names 2",
        ),
        "temperature NaN": (with_(temperature="nan"), "'temperature' must be a positive finite"),
        "temperature negative": (
            with_(temperature="-1"),
            "'temperature' must be a positive finite",
        ),
        "temperature text": (with_(temperature="hot"), "malformed metadata_props"),
        "preprocessing not JSON": (with_(preprocessing="{"), "malformed metadata_props"),
        "preprocessing unknown key": (
            with_(preprocessing=json.dumps({**pre, "shear": 3})),
            "malformed metadata_props",
        ),
        "preprocessing zero std": (
            with_(preprocessing=json.dumps({**pre, "std": [0.5, 0.0, 0.5]})),
            "std must be positive",
        ),
        "preprocessing two means": (
            with_(preprocessing=json.dumps({**pre, "mean": [0.5, 0.5]})),
            "mean must be three numbers",
        ),
        "input size vs metadata": (
            with_(preprocessing=json.dumps({**pre, "input_size": 224})),
            "does not take 3x224x224 images",
        ),
        "not ONNX at all": (b"\x00garbage\xff" * 10, "not a loadable ONNX model"),
    }


def test_malformed_onnx_metadata_is_refused_by_name(tmp_path):
    cases = _bad_metadata_cases()
    refused, wrong = [], []
    for name, (model, message) in cases.items():
        path = tmp_path / (name.replace(" ", "_") + ".onnx")
        if isinstance(model, bytes):
            path.write_bytes(model)
        else:
            onnx.save(model, str(path))
        try:
            OnnxClassifier(path, threads=1)
        except DataError as exc:
            if str(path) in str(exc) and message in str(exc):
                refused.append(name)
            else:
                wrong.append(f"{name}: {exc}")
    record("unsafe load: ONNX file with missing or malformed metadata", len(cases), len(refused))
    assert wrong == [] and sorted(refused) == sorted(cases)


def test_predict_cli_refuses_a_malformed_model_in_one_line(tmp_path):
    """The service-side command: exit 2, one line naming the file, no traceback."""
    path = tmp_path / "bad.onnx"
    onnx.save(tiny_onnx(metadata={**good_metadata(), "temperature": "0"}), str(path))
    create_image_folder(tmp_path / "img", {"a": 1})
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", "--model", str(path), str(tmp_path / "img")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"predict: {path}: metadata_props 'temperature' must be a positive finite number, not '0'"
    ]


# ---- Devices ------------------------------------------------------------------------------


def _resolve_without_gpu(device: str) -> subprocess.CompletedProcess:
    """Resolve the runtime in a process where CUDA is hidden, as on a machine without a GPU
    (CUDA_VISIBLE_DEVICES="" also hides a real GPU from torch)."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from pipeline.modeling.runtime import resolve\n"
        "from pipeline.errors import PipelineError\n"
        f"try:\n    print(resolve({device!r}, 'auto').device)\n"
        "except PipelineError as exc:\n    print('ERROR', exc); sys.exit(3)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )


def test_device_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back_saying_so():
    asked = _resolve_without_gpu("cuda")
    assert asked.returncode == 3
    assert asked.stdout.strip() == (
        "ERROR device: cuda was asked for, but torch sees no CUDA device (use device: auto)"
    )
    auto = _resolve_without_gpu("auto")
    assert auto.returncode == 0 and auto.stdout.strip() == "cpu"
    assert "device: auto found no CUDA device; running on the CPU" in auto.stderr
