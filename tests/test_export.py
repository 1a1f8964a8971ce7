"""export → onnx_check → predict on a small real model (embedded Lite0 weights), CPU only."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pipeline.data.images import load_rgb
from pipeline.data.rawstore import RawStore
from pipeline.data.splits import read_split
from pipeline.modeling import model as checkpoints
from pipeline.modeling import onnx_parts, quantization
from pipeline.modeling.model import load_checkpoint, load_classifier, save_checkpoint
from pipeline.modeling.reference import ReferenceFeatures
from pipeline.reporting import headline
from pipeline.stages import (
    evaluate,
    export,
    features,
    finetune,
    onnx_check,
    train_head,
)
from pipeline.system import memo
from tests.support.docs import blocks_run_by
from tests.support.exports import counted_calls, counted_exports
from tests.support.images import colour_images
from tests.support.project import REPO_ROOT, params_from
from tests.support.world import TinyWorld

# make test: one worker runs the whole module, so its module-scoped fixture is built once
pytestmark = [pytest.mark.slow, pytest.mark.one_worker]

# Runs a snippet with `import torch` (and this project's heavier dependencies) made to fail.
WITHOUT_TORCH = """
import runpy, sys
for name in ("torch", "torchvision", "yaml", "pandas", "timm"):
    sys.modules[name] = None  # `import name` now raises ImportError
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A workspace where every stage up to onnx_check has run on colour images with the
    embedded ImageNet weights (the head only: finetune.epochs 0); yields (params, metrics)."""
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as monkeypatch:
        world = TinyWorld.build(
            root,
            monkeypatch,
            images=colour_images(root / "images"),
            model={"weights": "imagenet"},
            head={"epochs": 20, "patience": 20},
            finetune={"epochs": 0},
            export={"calibration_images": 30},
            onnx_check={"latency_runs": 10, "throughput_batches": 2},
        )
        world.run(features, train_head, finetune, evaluate, export)
        yield world(), world.run(onnx_check)


def run_without_torch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_onnx_file_is_self_describing(exported):
    params, _ = exported
    paths = params.paths
    proto = onnx.load(str(paths.onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert not list(paths.onnx.parent.glob("*.data")), "weights must live inside the .onnx file"
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert (
        inp.name == "input"
        and dims[0].dim_param
        and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    )
    assert [o.name for o in proto.graph.output] == ["logits"]

    meta = {p.key: p.value for p in proto.metadata_props}
    _, card, _ = load_classifier(paths.model)
    assert json.loads(meta["classes"]) == card.classes == ["blue", "green", "red"]
    assert json.loads(paths.labels.read_text()) == card.classes
    assert (int(meta["input_size"]), json.loads(meta["mean"]), json.loads(meta["std"])) == (
        224,
        [0.5, 0.5, 0.5],
        [0.5, 0.5, 0.5],
    )
    assert meta["resize"] == "squash" and "ignoring its aspect ratio" in meta["resize_policy"]
    assert meta["backbone"] == "efficientnet_lite0"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["params_sha256"])
    assert meta["params_sha256"] == export.params_sha256(params)
    assert meta["params_sha256"] != export.params_sha256(
        params_from({"head": {"lr": 0.01}, "data": {"source": params.data.source}})
    )
    evaluated = json.loads(paths.metrics_file("evaluate").read_text())["finetuned"]
    assert json.loads(meta["test_metrics"])["top1"] == evaluated["top1"]
    calibration = json.loads(paths.calibration.read_text())
    assert float(meta["temperature"]) == pytest.approx(calibration["temperature"]["finetuned"])
    card_text = paths.model_card.read_text()
    for heading in (
        "## Intended use",
        "## Data",
        "## Test metrics",
        "## Preprocessing",
        "## Limits",
    ):
        assert heading in card_text
    assert "0: blue, 1: green, 2: red" in card_text


def test_onnx_matches_pytorch_and_int8_keeps_accuracy(exported):
    params, metrics = exported
    on_disk = json.loads(params.paths.metrics_file("onnx_check").read_text())
    assert on_disk == metrics and metrics["passed"] and metrics["failures"] == []
    assert metrics["images"] == len(read_split(params.paths, "test"))
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["batch1_max_abs_diff"] <= 1e-4
    assert metrics["top1_agreement"] == 1.0
    assert metrics["onnx_top1"] == metrics["torch_top1"] == 1.0
    assert 0 < metrics["cpu_latency_ms_p50"] <= metrics["cpu_latency_ms_p95"]
    cpu = metrics["cpu"]  # where it ran, and which int8 kernels onnxruntime picked there
    assert cpu["model"] and cpu["machine"] == "x86_64" and cpu["onnxruntime"] == ort.__version__
    assert "sse4_1" in cpu["features"] and cpu["onnxruntime_int8_kernel"]
    assert metrics["disagreements"] == 0 and metrics["significance"] == 0.05
    assert metrics["cpu_throughput_ips"] > 0
    int8 = metrics["int8"]
    assert int8["top1"] == 1.0 and int8["top1_drop"] <= 0.01 and int8["passed"]
    assert (int8["lost"], int8["gained"]) == (0, 0) and int8["drop_p_value"] > 0.5
    assert int8["size_mb"] < metrics["size_mb"] / 2  # int8 weights: about a quarter
    proto = onnx.load(str(params.paths.onnx_int8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert {p.key for p in proto.metadata_props} >= {"classes", "preprocessing", "temperature"}


# Under qemu-x86_64: the int8 model's logits for IMAGES (.npy) into OUT, and which CPU
# (and so which onnxruntime int8 kernels) the emulator presented.
EMULATED_LOGITS = """
import json, sys
import numpy as np
import onnxruntime as ort
from pipeline.system.cpu import cpu_info
model, images, out = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
np.save(out, session.run(None, {"input": np.load(images)})[0])
print(json.dumps(cpu_info().to_dict()))
"""


def emulated_int8_logits(model: Path, images: Path, cpu: str, out: Path) -> dict:
    """The int8 logits computed on ``cpu``'s kernels, emulated by ``qemu-x86_64 -cpu``."""
    done = subprocess.run(
        ["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", EMULATED_LOGITS, model, images, out],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"cpu": json.loads(done.stdout.splitlines()[-1]), "logits": np.load(out)}


def test_int8_computes_the_same_on_avx2_kernels_as_on_exact_ones(exported, tmp_path):
    """Issue #16: onnxruntime's u8×s8 kernels saturate on AVX2 (and AVX-512 without VNNI)
    but not on SSE4 or VNNI. The exported int8 model must give the same logits on both
    kinds (up to float rounding), so its accuracy cannot depend on the consumer's CPU.
    Both run under qemu's CPU emulation, whatever this machine's own CPU is."""
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 not found (Debian: apt-get install qemu-user; .ci/run does)")
    params, _ = exported
    paths = read_split(params.paths, "test")["path"].tolist()[::3][:6]
    _, card, _ = load_classifier(params.paths.model)
    images = tmp_path / "images.npy"
    refs = RawStore.open(params.paths.raw).locate(paths)
    np.save(images, np.stack([card.preprocessing(load_rgb(ref)) for ref in refs]))
    avx2 = emulated_int8_logits(params.paths.onnx_int8, images, "Haswell-v4", tmp_path / "a.npy")
    exact = emulated_int8_logits(params.paths.onnx_int8, images, "Nehalem", tmp_path / "s.npy")
    assert avx2["cpu"]["onnxruntime_int8_kernel"].startswith("avx2")
    assert exact["cpu"]["onnxruntime_int8_kernel"].startswith("sse")
    assert (avx2["cpu"]["int8_u8s8_exact"], exact["cpu"]["int8_u8s8_exact"]) == (False, True)
    fp32 = ort.InferenceSession(str(params.paths.onnx), providers=["CPUExecutionProvider"])
    reference = fp32.run(None, {"input": np.load(images)})[0]
    scale = np.abs(reference).max()
    difference = np.abs(avx2["logits"] - exact["logits"]).max()
    assert difference <= 0.02 * scale, (
        f"int8 logits differ by {difference:.3g} between AVX2 and exact kernels "
        f"(logits up to {scale:.3g}): saturation"
    )
    assert (avx2["logits"].argmax(1) == reference.argmax(1)).all()
    assert (exact["logits"].argmax(1) == reference.argmax(1)).all()


def test_batch_axis_is_dynamic(exported):
    params, _ = exported
    session = ort.InferenceSession(str(params.paths.onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 224, 224)).astype(np.float32)
    together = session.run(["logits"], {"input": x})[0]
    assert together.shape == (5, 3)
    one_by_one = np.concatenate(
        [session.run(["logits"], {"input": x[i : i + 1]})[0] for i in range(5)]
    )
    np.testing.assert_allclose(one_by_one, together, atol=1e-4)
    model, _, _ = load_classifier(params.paths.model)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(together, reference, atol=1e-4)


def test_a_drifted_model_fails_the_parity_check(exported, tmp_path, monkeypatch):
    params, _ = exported
    ws = Path.cwd()
    monkeypatch.chdir(tmp_path)
    for name in ("models", "data/raw", "data/splits", "metrics"):  # a copy of the workspace
        shutil.copytree(ws / name, tmp_path / name)
    # The PyTorch model moves on (a bias nudged) but the ONNX file is the old one.
    card, checkpoint = load_checkpoint(params.paths.model)
    state = checkpoint["state_dict"]
    bias = [k for k in state if k.startswith("head.") and k.endswith("bias")][-1]
    state[bias] = state[bias] + torch.tensor([0.0, 0.0, 5.0])
    save_checkpoint(params.paths.model, card, state)
    with pytest.raises(onnx_check.ParityError, match=r"max \|logit difference\|.*> onnx_check"):
        onnx_check.main(params)
    written = json.loads(params.paths.metrics_file("onnx_check").read_text())
    assert written["passed"] is False and written["max_abs_diff"] == pytest.approx(5.0, abs=0.01)


def test_the_pytorch_reference_runs_once_per_backbone(exported, tmp_path, monkeypatch):
    """onnx_check keeps the PyTorch fp32 features of the test images (issue #19): a check of
    the same model, or of a new head on the same backbone, reuses them and gives the same
    numbers; a changed backbone computes them again, and evaluate's fp32 CPU pass over a
    fine-tuned model is the check's reference too."""
    params, first = exported
    ws = Path.cwd()
    monkeypatch.chdir(tmp_path)
    for name in ("models", "data/raw", "data/splits", "data/features", "data/memo", "metrics"):
        shutil.copytree(ws / name, tmp_path / name)
    paths = params.paths
    rows = read_split(paths, "test")
    model, card, checkpoint = load_classifier(paths.model)
    kept = ReferenceFeatures(paths.memo, card, checkpoint["state_dict"], lambda: model)
    stored = kept.lookup(rows["sha256"])
    assert stored is not None and stored.shape == (len(rows), 1280)
    refs = RawStore.open(paths.raw).locate(rows["path"])
    images = torch.from_numpy(np.stack([card.preprocessing(load_rgb(ref)) for ref in refs]))
    with torch.inference_mode():
        direct = model(images).numpy()
    np.testing.assert_allclose(kept.logits(stored), direct, atol=1e-5)  # = Classifier.forward

    passes = []
    embed = ReferenceFeatures.embed
    monkeypatch.setattr(
        ReferenceFeatures,
        "embed",
        lambda self, batch: passes.append(len(batch)) or embed(self, batch),
    )
    again = onnx_check.main(params)
    assert passes == []  # the backbone did not run
    parity = ("max_abs_diff", "batch1_max_abs_diff", "top1_agreement", "torch_top1", "onnx_top1")
    assert {k: again[k] for k in parity} == {k: first[k] for k in parity}
    assert again["int8"]["top1"] == first["int8"]["top1"]

    state = load_checkpoint(paths.model)[1]["state_dict"]
    head_bias = [k for k in state if k.startswith("head.") and k.endswith("bias")][-1]
    state[head_bias] = state[head_bias] + torch.tensor([0.0, 0.0, 5.0])  # a new head
    save_checkpoint(paths.model, card, state)
    with pytest.raises(onnx_check.ParityError, match=r"max \|logit difference\|"):
        onnx_check.main(params)
    assert passes == []  # same backbone: the kept features, under the new head
    shifted = json.loads(paths.metrics_file("onnx_check").read_text())["max_abs_diff"]
    assert shifted == pytest.approx(5.0, abs=0.01)

    conv = next(k for k in state if k.startswith("backbone.") and k.endswith("weight"))
    state[conv] = state[conv] * 1.01  # fine-tuned: the backbone moved
    save_checkpoint(paths.model, card, state)  # no training params: evaluate runs the images
    fp32 = dataclasses.replace(params.evaluate, precision="fp32")  # on any CPU
    evaluate.main(dataclasses.replace(params, evaluate=fp32))
    assert sum(passes) == len(read_split(paths, "val")) + len(rows)  # val, test
    computed = len(passes)
    with pytest.raises(onnx_check.ParityError):  # the ONNX file is the old model's
        onnx_check.main(params)
    assert len(passes) == computed  # evaluate's pass was the reference


def checked_figures(metrics: dict) -> dict:
    """Every figure of onnx_check.json that is not a speed or where its inputs came from."""
    speed = {"cpu_latency_ms_p50", "cpu_latency_ms_p95", "cpu_throughput_ips"}
    figures = {k: v for k, v in metrics.items() if k not in speed | {"backbone_outputs"}}
    if "int8" in metrics:
        figures["int8"] = {k: v for k, v in metrics["int8"].items() if k not in speed}
    return figures


def test_onnx_check_keeps_each_files_backbone_outputs(exported, tmp_path, monkeypatch):
    """onnx_check keeps each ONNX file's backbone outputs on the test split (issue #19): a
    check of a file with the same backbone part runs only its head part over them and gives
    the same figures as a check that runs every image through the whole file; parts that
    do not compute what the whole file computes run the whole file, and a damaged kept
    output runs the images again."""
    params, first = exported
    assert first["backbone_outputs"] == {"onnx": "computed", "int8": "computed"}
    ws = Path.cwd()
    monkeypatch.chdir(tmp_path)
    for name in ("models", "data/raw", "data/splits", "data/features", "data/memo", "metrics"):
        shutil.copytree(ws / name, tmp_path / name)
    paths = params.paths
    tapped = counted_calls(monkeypatch, onnx_parts.OnnxParts, "tapped")
    again = onnx_check.main(params)
    assert tapped == [] and again["backbone_outputs"] == {"onnx": "kept", "int8": "kept"}
    assert checked_figures(again) == checked_figures(first)

    card, checkpoint = load_checkpoint(paths.model)
    state = checkpoint["state_dict"]
    head_bias = [k for k in state if k.startswith("head.") and k.endswith("bias")][-1]
    state[head_bias] = state[head_bias] + torch.tensor([0.3, -0.2, 0.1])  # a new head
    save_checkpoint(paths.model, card, state)
    export.main(params)
    new_head = onnx_check.main(params)
    assert tapped == [] and new_head["backbone_outputs"] == {"onnx": "kept", "int8": "kept"}
    assert new_head["passed"] and new_head["top1_agreement"] == 1.0
    for folder in (paths.memo / memo.ONNX_OUTPUTS.folder).iterdir():
        shutil.rmtree(folder)
    fresh = onnx_check.main(params)  # every image through both whole files
    assert fresh["backbone_outputs"] == {"onnx": "computed", "int8": "computed"}
    assert checked_figures(new_head) == checked_figures(fresh)
    assert len(tapped) == 2 * -(-len(read_split(paths, "test")) // 32)

    # Parts that compute other logits than the whole file: the whole file runs.
    head = onnx_parts.OnnxParts.head
    monkeypatch.setattr(onnx_parts.OnnxParts, "head", lambda self, f: head(self, f) + 1e-6)
    whole = onnx_check.main(params)
    assert whole["backbone_outputs"] == {"onnx": "whole file", "int8": "whole file"}
    assert checked_figures(whole) == checked_figures(fresh)
    monkeypatch.setattr(onnx_parts.OnnxParts, "head", head)

    for folder in (paths.memo / memo.ONNX_OUTPUTS.folder).iterdir():
        (folder / "outputs.npy").write_bytes(b"damaged")
    damaged = onnx_check.main(params)
    assert damaged["backbone_outputs"] == {"onnx": "computed", "int8": "computed"}
    assert checked_figures(damaged) == checked_figures(fresh)
    # A moved backbone computes them again: the next test.


def test_export_reuses_the_kept_graphs_of_the_backbone_and_head(exported, tmp_path, monkeypatch):
    """export keeps each part's graph (issue #19): a new head on the same backbone reuses the
    backbone's file and puts the new head's tensors into the head's kept structure; a moved
    backbone goes into the backbone's; nothing is exported again, and each joined file
    passes onnx_check against the PyTorch model. A head-only change builds no backbone
    (timm's model) and keeps the backbone's int8 calibration."""
    params, _ = exported
    ws = Path.cwd()
    monkeypatch.chdir(tmp_path)
    for name in ("models", "data/raw", "data/splits", "data/features", "data/memo", "metrics"):
        shutil.copytree(ws / name, tmp_path / name)
    exported_modules = counted_exports(monkeypatch)
    built = counted_calls(monkeypatch, checkpoints, "build_backbone")
    calibrated = counted_calls(monkeypatch, quantization, "backbone_calibration")
    graphs = params.paths.memo / "graphs"
    before = set(graphs.glob("*.onnx"))
    card, checkpoint = load_checkpoint(params.paths.model)
    state = checkpoint["state_dict"]
    head_bias = [k for k in state if k.startswith("head.") and k.endswith("bias")][-1]
    state[head_bias] = state[head_bias] + torch.tensor([0.3, -0.2, 0.1])  # a new head
    save_checkpoint(params.paths.model, card, state)
    export.main(params)
    assert exported_modules == [] and built == [] and calibrated == []
    assert len(set(graphs.glob("*.onnx")) - before) == 1  # the new head's
    checked = onnx_check.main(params)
    assert checked["passed"] and checked["max_abs_diff"] <= 1e-4
    assert checked["backbone_outputs"] == {"onnx": "kept", "int8": "kept"}

    conv = next(k for k in state if k.startswith("backbone.") and k.endswith("weight"))
    state[conv] = state[conv] * 1.01  # the backbone moved
    save_checkpoint(params.paths.model, card, state)
    export.main(params)
    assert exported_modules == [] and len(built) == 1 and len(calibrated) == 1
    checked = onnx_check.main(params)  # an ONNX file of the old backbone would fail here
    assert checked["passed"] and checked["max_abs_diff"] <= 1e-4
    # and so would the old backbone's kept ONNX outputs
    assert checked["backbone_outputs"] == {"onnx": "computed", "int8": "computed"}


def test_predict_without_torch(exported, tmp_path):
    params, _ = exported
    ws = Path.cwd()
    folder = tmp_path / "inbox"
    folder.mkdir()
    good = sorted(Path(params.data.source).glob("red/*.png"))[:2]
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    blue = next(Path(params.data.source).glob("blue/*.png"))
    done = run_without_torch(
        [
            "-m",
            "pipeline",
            "predict",
            "--model",
            str(ws / params.paths.onnx),
            "--top-k",
            "2",
            str(folder),
            str(blue),
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "broken.jpg" in done.stderr and "Traceback" not in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["path"]).name for r in lines] == [good[0].name, good[1].name, blue.name]
    assert [r["predictions"][0]["label"] for r in lines] == ["red", "red", "blue"]
    for row in lines:
        probs = [p["probability"] for p in row["predictions"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6

    # The probabilities are the calibrated softmax of the PyTorch model's logits.
    model, card, _ = load_classifier(ws / params.paths.model)
    temperature = float(
        json.loads((ws / params.paths.calibration).read_text())["temperature"]["finetuned"]
    )
    with torch.inference_mode():
        logits = model(torch.from_numpy(card.preprocessing(load_rgb(blue)))[None])[0]
    expected = torch.softmax(logits / temperature, 0).max().item()
    assert lines[2]["predictions"][0]["probability"] == pytest.approx(expected, abs=1e-4)


def test_predict_reports_a_missing_or_foreign_model(tmp_path):
    done = run_without_torch(
        ["-m", "pipeline", "predict", "--model", str(tmp_path / "nope.onnx"), "x.png"], tmp_path
    )
    assert (
        done.returncode == 2 and "nope.onnx" in done.stderr and "no such model file" in done.stderr
    )
    bare = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["input"], ["logits"])],
            "bare",
            [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3])],
            [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    done = run_without_torch(
        ["-m", "pipeline", "predict", "--model", str(tmp_path / "bare.onnx"), "x.png"], tmp_path
    )
    assert done.returncode == 2 and "metadata_props has no 'classes'" in done.stderr


def test_docs_service_snippet_runs_without_this_project(exported, tmp_path):
    params, _ = exported
    ws = Path.cwd()
    snippets = [b for b in blocks_run_by("tests/test_export.py") if b.lang == "python"]
    assert len(snippets) == 1, "docs/ should hold one service snippet run by this test"
    script = tmp_path / "service.py"
    script.write_text(snippets[0].code)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/model.onnx").write_bytes((ws / params.paths.onnx).read_bytes())
    image = next(Path(params.data.source).glob("green/*.png"))
    # Neither torch nor this project: only the ONNX file, onnxruntime, numpy and Pillow.
    without_project = WITHOUT_TORCH.replace('"timm"', '"timm", "pipeline"')
    done = subprocess.run(
        [sys.executable, "-c", without_project, str(script), str(image)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    label, probability = done.stdout.split()
    assert label == "green" and 0.5 < float(probability) <= 1.0


def test_outputs_lists_paths_and_headline_figures(exported):
    params, metrics = exported
    Path("params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    text = headline.describe_outputs()
    assert "  onnx             models/model.onnx" in text
    assert re.search(rf"ONNX test top-1 +{metrics['onnx_top1']:.4f}", text)
    drop = 100 * metrics["int8"]["top1_drop"]
    assert re.search(
        rf"int8 test top-1 +{metrics['int8']['top1']:.4f} \(drop {drop:.2f} pt\)", text
    )
    assert re.search(r"measured on +\S.*; int8 kernels \w", text)
    finetuned = json.loads(params.paths.metrics_file("evaluate").read_text())["finetuned"]
    assert re.search(rf"test top-1, fine-tuned +{finetuned['top1']:.4f}", text)
