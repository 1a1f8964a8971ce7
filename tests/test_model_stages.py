"""features → train_head → finetune → evaluate on tiny generated images, random weights, CPU."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.featurestore import FeatureCache, NpyRows, load_features
from pipeline.data.splits import read_split, read_splits, rows_of
from pipeline.errors import PipelineError
from pipeline.modeling import training
from pipeline.modeling.backbones import build_backbone
from pipeline.modeling.model import classifier_from_head, load_classifier
from pipeline.stages import download, evaluate, features, finetune, train_head
from pipeline.system import memo
from tests.support.exports import counted_exports
from tests.support.images import create_image_folder
from tests.support.project import params_with, write_split_rows


def test_features_are_cached_by_content(tiny_run):
    p = tiny_run()
    first = features.main(p)
    assert (first["computed"], first["reused"]) == (30, 0)
    arrays, index = load_features(p.paths)
    assert arrays["train"].shape == (21, 1280) and index["classes"] == ["bird", "cat", "dog"]
    assert np.isfinite(arrays["test"]).all()

    # Two new training images: only those are computed, the rest come from the cache.
    table = read_splits(p.paths)
    extra = create_image_folder(Path("extra"), {"cat": 2}, seed=9)
    for f in extra.rglob("*.png"):  # into the source, then the raw store
        shutil.copy(f, Path(p.data.source) / "cat" / f"extra_{f.name}")
    download.main(p)
    new = [
        {
            "path": f"data/raw/cat/extra_{f.name}",
            "label": "cat",
            "sha256": f"new{i}",
            "split": "train",
        }
        for i, f in enumerate(sorted(extra.rglob("*.png")))
    ]
    write_split_rows(p.paths.splits, pd.concat([table, pd.DataFrame(new)]))
    second = features.main(p)
    assert (second["computed"], second["reused"]) == (2, 30)
    again, _ = load_features(p.paths)
    assert np.array_equal(again["test"], arrays["test"])


def test_features_stream_the_cache_in_shards_and_fill_copies(tiny_run, monkeypatch):
    """The stage never holds every embedding: the cache is written and read a shard at a
    time, the arrays are memory-mapped files. Same bytes as one shard, copies included."""
    p = tiny_run()
    table = read_splits(p.paths)
    first = rows_of(table, "train").iloc[0]  # a copy of it in the test split
    source = Path(p.data.source) / Path(first["path"]).relative_to(p.paths.raw)
    shutil.copy(source, source.with_name(f"zz_copy_{source.name}"))
    download.main(p)
    twin = {**first, "path": f"{Path(first['path']).parent}/zz_copy_{source.name}", "split": "test"}
    write_split_rows(p.paths.splits, pd.concat([table, pd.DataFrame([twin])]))
    at = rows_of(read_splits(p.paths), "test")["path"].tolist().index(twin["path"])
    whole = features.main(p)
    one_shard, _ = load_features(p.paths)
    one_shard = {name: np.array(a) for name, a in one_shard.items()}

    monkeypatch.setattr(FeatureCache, "shard_rows", 8)
    shutil.rmtree(p.paths.memo / memo.FEATURES.folder)
    assert features.main(p)["computed"] == whole["computed"] == 30
    shards = sorted((p.paths.memo / memo.FEATURES.folder).rglob("shard-*.npz"))
    assert [len(np.load(s)["sha256"]) for s in shards] == [8, 8, 8, 6]
    again = features.main(p)
    assert (again["computed"], again["reused"]) == (0, 31)
    arrays, _ = load_features(p.paths)
    assert all(isinstance(a, np.memmap) for a in arrays.values())
    assert np.array_equal(arrays["test"][at], arrays["train"][0])
    for name, array in one_shard.items():
        assert np.array_equal(arrays[name], array), name


def test_rows_written_in_place_are_the_file_np_save_writes(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(7, 3, 5), (4, 5), (0, 5)]:
        array = rng.standard_normal(shape, dtype=np.float32)
        file = NpyRows.create(tmp_path / "rows.npy", shape)
        parts = [file.view(v) for v in range(shape[1])] if len(shape) == 3 else [file]
        for v, part in enumerate(parts):  # rows in any order
            order = rng.permutation(shape[0])
            part.put(order, array[order, v] if len(shape) == 3 else array[order])
            assert np.array_equal(
                part.take(order), array[order, v] if len(shape) == 3 else array[order]
            )
        with pytest.raises(ValueError, match=r"rows of shape \(4,\)"):
            parts[0].put(np.arange(1), np.zeros((1, 4), np.float32))
        file.close()
        np.save(tmp_path / "saved.npy", array)
        assert (tmp_path / "rows.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()


def test_a_features_run_cut_short_keeps_the_embeddings_of_its_whole_shards(tiny_run, monkeypatch):
    """At a million images the stage embeds for hours: a crash keeps what is done, a
    shard at a time, and the next run computes only the rest."""
    p = tiny_run(features={"batch_size": 4})
    monkeypatch.setattr(FeatureCache, "shard_rows", 8)
    real_build = features.engines.build

    def failing_after_four_batches(*args, **kwargs):
        engine, calls = real_build(*args, **kwargs), []
        real_embed = engine.embed

        def embed(images):
            calls.append(len(images))
            if len(calls) > 4:
                raise RuntimeError("the machine went away")
            return real_embed(images)

        return dataclasses.replace(engine, embed=embed)

    monkeypatch.setattr(features.engines, "build", failing_after_four_batches)
    with pytest.raises(RuntimeError, match="went away"):
        features.main(p)
    assert not p.paths.features.exists()
    shards = sorted((p.paths.memo / memo.FEATURES.folder).rglob("shard-*.npz"))
    assert [len(np.load(s)["sha256"]) for s in shards] == [8, 8]
    monkeypatch.setattr(features.engines, "build", real_build)
    assert features.main(p)["computed"] == 30 - 16


def test_augmented_views_are_cached_for_training(tiny_run):
    p = tiny_run(features={"augmented_views": 2})
    features.main(p)
    arrays, _ = load_features(p.paths)
    assert arrays["train_aug"].shape == (21, 2, 1280)
    assert not np.allclose(arrays["train_aug"][:, 0], arrays["train_aug"][:, 1])
    assert features.main(p)["computed"] == 0  # same views, same seeds: all cached


def test_head_learns_separable_features(tiny_run):
    p = tiny_run(head={"lr": "auto"})
    features.main(p)
    metrics = train_head.main(p)
    assert 1e-6 <= metrics["lr"] <= 1.0
    history = pd.read_csv(p.paths.head_curves)
    assert list(history.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]


def test_curves_are_written_as_pandas_wrote_them(tmp_path):
    """The curves DVC plots and report read are the same bytes as pandas'
    ``round(6).to_csv`` gave them: rounding, shortest repr, integers, missing figures (the
    head-alone row of finetune), and the header alone for no epochs."""
    history = [
        {"epoch": 0, "train_loss": None, "train_acc": None, "val_loss": 0.5572674, "val_acc": 1.0},
        {
            "epoch": 1,
            "train_loss": 2.0000004999,
            "train_acc": 0.1234565,
            "val_loss": 1e-05,
            "val_acc": 0.966513,
        },
        {
            "epoch": 2,
            "train_loss": 12345.6789012345,
            "train_acc": 2 / 3,
            "val_loss": 1e-07,
            "val_acc": 0.0,
        },
    ]
    for rows in (history, history[1:], history[:1], []):
        ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
        training.write_curves(ours, rows)
        frame = pd.DataFrame(rows, columns=list(training.CURVE_COLUMNS))
        frame.round(6).to_csv(theirs, index=False)
        assert ours.read_bytes() == theirs.read_bytes(), rows


def test_nan_loss_stops_training_and_saves_nothing(tiny_run):
    p = tiny_run()
    features.main(p)
    bad = p.paths.features / "train.npy"
    arr = np.load(bad)
    arr[0, 0] = np.inf
    np.save(bad, arr)
    with pytest.raises(PipelineError, match=r"loss became (nan|inf).*nothing was saved"):
        train_head.main(p)
    assert not p.paths.head.exists()


def test_class_balanced_loss_weighs_classes_by_inverse_frequency():
    y = np.array([0, 0, 0, 1])  # class 2 has no training images
    balanced = training.training_criterion(y, 3, True, 0.1)
    assert torch.allclose(balanced.weight, torch.tensor([0.5, 1.5, 0.0]))
    assert balanced.label_smoothing == 0.1
    assert training.training_criterion(y, 3, False, 0.0).weight is None


def test_finetune_and_evaluate(tiny_run):
    p = tiny_run()  # finetune.class_balanced is on by default: the weighted loss runs here
    features.main(p)
    train_head.main(p)
    metrics = finetune.main(p)
    assert metrics["epochs_run"] == 1 and metrics["train_images_per_second"] > 0
    model, card, _ = load_classifier(p.paths.model)
    assert card.classes == ["bird", "cat", "dog"] and card.backbone == "efficientnet_lite0"
    assert not (p.paths.checkpoints / "finetune.pt").exists()

    result = evaluate.main(p)
    for name in ("head", "finetuned"):
        assert {"top1", "top5", "mean_per_class_acc", "macro_f1", "ece"} <= set(result[name])
        assert 0 <= result[name]["top1"] <= 1
    assert json.loads(p.paths.calibration.read_text())["temperature"]["finetuned"] > 0
    assert (p.paths.evaluation / "confusion_finetuned.png").read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(p.paths.confusion)) == 6


def test_zero_epochs_gives_backbone_plus_head(tiny_run, caplog):
    p = tiny_run(finetune={"epochs": 0})
    features.main(p)
    train_head.main(p)
    assert finetune.main(p)["epochs_run"] == 0
    model, card, _ = load_classifier(p.paths.model)
    built = classifier_from_head(
        build_backbone(p.model.backbone, p.model.weights),
        card,
        torch.load(p.paths.head, weights_only=True)["state_dict"],
    ).state_dict()
    saved = torch.load(p.paths.model, weights_only=True)["state_dict"]
    assert list(saved) == list(built) and all(torch.equal(saved[k], v) for k, v in built.items())

    # A second join takes the backbone's kept weights, and writes the same file; damaged
    # kept weights are built again.
    first = p.paths.model.read_bytes()
    (kept,) = (p.paths.memo / memo.BACKBONE_STATES.folder).iterdir()
    caplog.set_level("INFO", logger="pipeline.modeling.backbones")
    finetune.main(p)
    assert "its kept weights" in caplog.text and p.paths.model.read_bytes() == first
    torn = (kept / "state.pt").read_bytes()
    (kept / "state.pt").write_bytes(torn[: len(torn) // 2])
    finetune.main(p)
    assert "building the backbone again" in caplog.text and p.paths.model.read_bytes() == first
    assert (
        torch.load(kept / "state.pt", weights_only=True).keys()
        == model.backbone.state_dict().keys()
    )

    arrays, _ = load_features(p.paths)
    from pipeline.data.rawstore import RawStore
    from pipeline.data.splits import read_split
    from pipeline.modeling.datasets import ImageDataset

    rows = read_split(p.paths, "test")
    sources = RawStore.open(p.paths.raw).locate(rows["path"])
    x = torch.stack(
        [ImageDataset(sources, [0] * len(rows), card.preprocessing)[i][0] for i in range(len(rows))]
    )
    with torch.no_grad():
        direct = model.head(torch.tensor(arrays["test"]))
        full = model(x)
    assert torch.allclose(full, direct, atol=1e-4)  # onnxruntime fp32 features = PyTorch fp32

    # So evaluate scores the joined model on the cached features, and says so.
    caplog.set_level("INFO", logger="pipeline.stages.evaluate")
    result = evaluate.main(p)
    assert result["finetuned"] == result["head"]
    assert "scoring backbone + head on the cached features" in caplog.text

    # A model whose head is not train_head's (trained elsewhere, or stale) is run on images.
    checkpoint = torch.load(p.paths.model, weights_only=True)
    weight = next(k for k in checkpoint["state_dict"] if k.startswith("head.") and "weight" in k)
    checkpoint["state_dict"][weight] = checkpoint["state_dict"][weight] * 2
    torch.save(checkpoint, p.paths.model)
    assert not evaluate.joined_untrained(p.paths)
    assert evaluate.main(p)["finetuned"] != result["head"]


def test_feature_engines_agree_with_the_reference_preprocessing(tiny_run, monkeypatch):
    """onnxruntime and PyTorch fp32 embed uint8 batches (normalised inside the model) as the
    backbone embeds ``Preprocessing``'s float arrays; the exported graph is reused."""
    from pipeline.data.images import load_rgb
    from pipeline.data.rawstore import RawStore
    from pipeline.modeling import engines
    from pipeline.modeling.backbones import build_backbone
    from pipeline.modeling.datasets import eval_geometry
    from pipeline.modeling.runtime import resolve

    p = tiny_run(features={"engine": "onnxruntime"})
    first = features.main(p)
    assert first["engine"] == "onnxruntime-fp32"
    folder = p.paths.memo / "graphs"
    graphs = sorted(folder.glob("*.onnx"))  # by content: Normalise's and the backbone's
    structures = sorted((folder / "structures").glob("*.onnx"))
    assert len(graphs) == len(structures) == 2
    contents = [g.read_bytes() for g in [*graphs, *structures]]
    by_onnx, _ = load_features(p.paths)

    torch_params = tiny_run(features={"engine": "torch", "precision": "fp32"})
    assert features.main(torch_params)["engine"] == "torch-fp32"
    by_torch, _ = load_features(p.paths)
    backbone = build_backbone("efficientnet_lite0", "none", p.model.resize)
    rows = read_split(p.paths, "test")
    images = [load_rgb(ref) for ref in RawStore.open(p.paths.raw).locate(rows["path"])]
    reference = np.stack([backbone.preprocessing(img) for img in images])
    with torch.no_grad():
        expected = backbone.module.eval()(torch.from_numpy(reference)).numpy()
    scale = np.abs(expected).max()
    assert np.abs(by_torch["test"] - expected).max() <= 1e-5 * scale
    assert np.abs(by_onnx["test"] - expected).max() <= 1e-4 * scale

    # Built again (a rerun), the onnxruntime engine loads the kept graphs: same files.
    runtime = resolve("cpu", "fp32")
    exports = counted_exports(monkeypatch)

    def embedded(module) -> np.ndarray:
        engine = engines.build("onnxruntime", module, backbone.preprocessing, runtime, p.paths.memo)
        return engine.embed(batch)

    batch = torch.from_numpy(np.stack([eval_geometry(backbone.preprocessing)(i) for i in images]))
    assert np.abs(embedded(backbone.module) - expected).max() <= 1e-4 * scale
    assert sorted(folder.glob("*.onnx")) == graphs and exports == []
    assert [g.read_bytes() for g in [*graphs, *structures]] == contents
    # A damaged kept graph is made again rather than failing the stage.
    largest = max(graphs, key=lambda g: g.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:1000])
    assert np.abs(embedded(backbone.module) - expected).max() <= 1e-4 * scale
    assert largest.stat().st_size > 1_000_000 and exports == []  # from the kept structure

    # New weights of the same architecture go into the kept structure: no export, the
    # new weights' features.
    moved = copy.deepcopy(backbone.module)
    with torch.no_grad():
        for weight in moved.parameters():
            weight.mul_(1.05)
        expected = moved.eval()(torch.from_numpy(reference)).numpy()
    scale = np.abs(expected).max()
    assert np.abs(embedded(moved) - expected).max() <= 1e-4 * scale
    assert exports == [] and len(list(folder.glob("*.onnx"))) == 3


def test_a_kept_graph_takes_new_tensors_only_where_it_computes_as_the_module(tmp_path, monkeypatch):
    """kept_graph (issue #19): the same tensors load the kept file; new tensors of the same
    architecture go into its kept structure without an export; a kept structure that
    computes something else (another op under the same names, another architecture) is
    exported again, and the result is always the module's."""
    import onnx

    from pipeline.modeling import engines

    exports = counted_exports(monkeypatch)
    torch.manual_seed(0)
    example = torch.zeros(2, 8)
    x = torch.randn(5, 8)

    def graph_of(module) -> np.ndarray:
        proto = engines.kept_graph(module, example, ("x", "y"), 18, tmp_path)
        got = engines.onnx_session(proto).run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - module(x).numpy()).max() <= 1e-5
        return proto

    def head() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 3),
        ).eval()

    first = head()
    graph_of(first)
    assert exports == ["Sequential"]
    graph_of(first)
    graph_of(copy.deepcopy(first))
    assert exports == ["Sequential"]  # the same tensors: the kept file
    graph_of(head())
    assert exports == ["Sequential"]  # new tensors: the kept structure
    structures = list((tmp_path / "graphs" / "structures").glob("*.onnx"))
    assert len(structures) == 1

    # Under the structure's name, a graph whose first ReLU is a Sigmoid: same initializers,
    # other outputs.
    foreign = onnx.load(str(structures[0]))
    next(n for n in foreign.graph.node if n.op_type == "Relu").op_type = "Sigmoid"
    structures[0].write_bytes(foreign.SerializeToString())
    graph_of(head())
    assert exports == ["Sequential"] * 2
    # Under its name, a graph without the module's tensors (another architecture's).
    other = torch.nn.Sequential(torch.nn.Linear(8, 3)).eval()
    graph_of(other)
    other_structure = next(
        s for s in (tmp_path / "graphs" / "structures").glob("*.onnx") if s != structures[0]
    )
    structures[0].write_bytes(other_structure.read_bytes())
    graph_of(head())
    assert exports == ["Sequential"] * 4


def test_feature_engine_choice():
    from pipeline.errors import ConfigError
    from pipeline.modeling import engines
    from pipeline.modeling.runtime import Runtime

    cpu = Runtime(torch.device("cpu"), bf16=True, workers=1)
    assert engines.choose("auto", "auto", cpu) == "onnxruntime"
    assert engines.choose("auto", "fp32", cpu) == "onnxruntime"
    assert engines.choose("auto", "bf16", cpu) == "torch"
    assert engines.choose("torch", "auto", cpu) == "torch"
    with pytest.raises(ConfigError, match="features.engine: onnxruntime computes in fp32"):
        engines.choose("onnxruntime", "bf16", cpu)
    with pytest.raises(ConfigError, match="features.engine must be one of"):
        engines.choose("tensorrt", "auto", cpu)
    with pytest.raises(Exception, match="features.engine"):
        params_with(features={"engine": "tensorrt"})


def test_finetune_keeps_the_epoch_with_the_best_val_accuracy():
    """Caltech-101's history (head alone soft but more accurate) keeps the head; accuracy
    first, then loss, and the first of equals."""
    caltech = pd.DataFrame(
        {
            "epoch": [0, 1, 2, 3, 4, 5],
            "val_loss": [0.557267, 0.606086, 0.442777, 0.300033, 0.351813, 0.355048],
            "val_acc": [0.967667, 0.866051, 0.904157, 0.957275, 0.945727, 0.939954],
        }
    )
    assert finetune.kept_epoch(caltech.to_dict("records"))["epoch"] == 0
    better = caltech.assign(val_acc=[0.96, 0.97, 0.98, 0.98, 0.98, 0.5])
    better.loc[3, "val_loss"] = 0.4  # ties epoch 2 on accuracy with a lower loss
    better.loc[4, "val_loss"] = 0.4  # equals epoch 3: the first is kept
    assert finetune.kept_epoch(better.to_dict("records"))["epoch"] == 3
    assert finetune.beats(0.9, 1.0, 0.8, 0.1) and not finetune.beats(0.8, 0.2, 0.8, 0.1)


@pytest.mark.gpu
def test_model_stages_train_on_cuda(tiny_run):
    """``device: auto`` on a GPU machine: features in PyTorch on CUDA (bf16 where native),
    the head and fine-tuning on CUDA, and a checkpoint that loads on the CPU."""
    p = tiny_run(device="auto")
    assert features.main(p)["engine"].startswith("torch")
    train_head.main(p)
    metrics = finetune.main(p)
    assert metrics["device"].startswith("cuda") and metrics["epochs_run"] == 1
    model, _, _ = load_classifier(p.paths.model)
    assert next(model.parameters()).device.type == "cpu"
    result = evaluate.main(p)
    assert 0 <= result["finetuned"]["top1"] <= 1
