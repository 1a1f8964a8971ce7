"""promote: champion and challenger on the same test images through onnxruntime, the
registry's versions and its production alias, rollback, predict and a service following
production, on a folder and on a real S3 API server (moto) on 127.0.0.1.

The models are small real ONNX classifiers with the pipeline's metadata
(tests/support/models.py): on the colour images the plain one is right everywhere and a
permuted one wrong everywhere, so each decision has one right answer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.splits import read_split
from pipeline.errors import PipelineError
from pipeline.registry.backends import RegistryError
from pipeline.registry.store import Registry, parse_ref, resolve
from pipeline.serving.followed import FollowedModel
from pipeline.stages import (
    evaluate,
    export,
    features,
    finetune,
    onnx_check,
    promote,
    split,
    train_head,
)
from tests.support.images import colour_images
from tests.support.models import colour_model, rolled
from tests.support.project import REPO_ROOT, params_with, pipeline_command
from tests.support.s3 import s3_server
from tests.support.world import TinyWorld

TEST_IMAGES = 18  # 3 colours x 30 images, 20% test


@pytest.fixture
def world(tmp_path, monkeypatch) -> TinyWorld:
    return TinyWorld.for_promotion(tmp_path, monkeypatch)


def candidate(world: TinyWorld, **model) -> dict:
    """Export the colour model ``model`` as this run's challenger and promote it."""
    params = world()
    colour_model(params.paths.onnx, **model)
    return promote.main(params)


def test_first_then_promoted_then_kept(world):
    params = world()
    first = candidate(world)
    assert (first["decision"], first["version"], first["production_version"]) == ("first", 1, 1)
    assert first["champion_version"] is None and first["images"] == 0
    empty = pd.read_parquet(params.paths.champion_images)
    assert list(empty.columns) == ["sha256", "label", "split"] and empty.empty

    same = candidate(world, seed=1)  # the same predictions, another file
    assert (same["decision"], same["version"], same["production_version"]) == ("promoted", 2, 2)
    assert same["champion_version"] == 1 and same["images"] == TEST_IMAGES
    assert same["left_out"] == 0 and same["p_value"] == 1.0
    assert same["challenger"] == same["champion"] == {"top1": 1.0, "mean_class_accuracy": 1.0}
    seen = pd.read_parquet(params.paths.champion_images)
    assert len(seen) == 90 and set(seen["split"]) == {"train", "val", "test"}

    worse = candidate(world, permute=1, seed=2)
    assert (worse["decision"], worse["version"], worse["production_version"]) == ("kept", 3, 2)
    assert worse["challenger"]["top1"] == 0.0 and worse["champion"]["top1"] == 1.0
    assert (worse["champion_only_right"], worse["challenger_only_right"]) == (TEST_IMAGES, 0)
    assert worse["p_value"] == pytest.approx(0.5**TEST_IMAGES, rel=1e-5)
    assert worse["reason"].startswith("worse than version 2: top-1 0.0000 vs 1.0000 on 18 test")
    assert json.loads(params.paths.metrics_file("promote").read_text()) == worse
    assert json.loads(params.paths.production.read_text())["version"] == 2

    registry = Registry(params.promote.registry, params.promote.name)
    assert registry.versions() == [1, 2, 3]
    records = [registry.version(v) for v in (1, 2, 3)]
    assert [r["decision"] for r in records] == ["first", "promoted", "kept"]
    data = records[2]["data"]
    test_rows = read_split(params.paths, "test")
    assert (
        data["splits"]["test"] == hashlib.sha256(test_rows.to_csv(index=False).encode()).hexdigest()
    )
    assert records[2]["params_sha256"] == f"{2:064x}"  # from the file's own metadata
    assert registry.alias().version == 2


def test_min_gain_keeps_a_challenger_that_is_only_as_good(world):
    candidate(world)
    same = promote.main(world(promote={"min_gain": 0.01}))
    assert same["decision"] == "kept" and "below promote.min_gain 0.01" in same["reason"]
    assert same["production_version"] == 1


def test_a_changed_class_set_is_compared_on_the_classes_both_know(world):
    candidate(world)
    changed = candidate(world, classes=("red", "green", "yellow"))
    assert changed["classes"] == {"compared": 2, "added": ["yellow"], "removed": ["blue"]}
    assert changed["images"] == 12 and changed["left_out_other_classes"] == 6
    assert changed["decision"] == "promoted"
    assert changed["reason"].endswith(
        "compared on the 2 classes both know (added yellow; removed blue)"
    )


def test_test_images_the_champion_trained_on_are_left_out(world):
    candidate(world)
    world.run(split, split={"seed": 7})  # the same images cut otherwise
    moved = promote.main(world(split={"seed": 7}))
    test = read_split(world(split={"seed": 7}).paths, "test")
    assert moved["left_out"] > 0
    assert moved["images"] + moved["left_out"] == len(test) == TEST_IMAGES


def test_rollback_and_set_production_by_one_command(world):
    for seed in (1, 2):
        candidate(world, seed=seed)
    candidate(world, permute=1, seed=3)
    reg = ["registry", "--registry", world().promote.registry, "--name", "classifier"]
    listed = pipeline_command(world.root, *reg, "list")
    assert listed.returncode == 0, listed.stderr
    assert "production: version 2" in listed.stdout and "   3  " in listed.stdout
    back = pipeline_command(world.root, *reg, "rollback")
    assert back.returncode == 0 and back.stdout.startswith("production: version 1 ")
    again = pipeline_command(world.root, *reg, "rollback")
    assert again.returncode == 1 and "no earlier version to roll back to" in again.stderr
    by_hand = pipeline_command(world.root, *reg, "set-production", "3")
    assert by_hand.returncode == 0 and by_hand.stdout.startswith("production: version 3 ")
    registry = Registry(world().promote.registry, "classifier")
    assert [h["version"] for h in registry.alias().history] == [1]


def test_a_registry_that_cannot_be_used_fails_promote_naming_it(world, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the registry should be")
    params = world(promote={"registry": str(blocked)})
    colour_model(params.paths.onnx)
    with pytest.raises(PipelineError, match=f"registry {blocked}"):
        promote.main(params)
    assert not params.paths.metrics_file("promote").exists()


WITHOUT_TORCH = (
    "import runpy, sys\n"
    "for name in ('torch', 'torchvision', 'pandas', 'timm'):\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['pipeline', *sys.argv[1:]]\n"
    "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n"
)


def test_predict_resolves_verifies_and_caches_production_without_torch(world, tmp_path):
    candidate(world)
    candidate(world, seed=1)
    registry = world().promote.registry
    cache = tmp_path / "cache"
    images = str(world.images / "red")

    def predict(*model: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, "predict", *model, "--cache", str(cache), images],
            cwd=world.root,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )

    done = predict("--model", f"{registry}#classifier")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 30 and {line["predictions"][0]["label"] for line in lines} == {"red"}
    sha = Registry(registry, "classifier").alias().sha256
    assert f"version 2 (sha256 {sha[:12]})" in done.stderr
    assert [p.name for p in cache.iterdir()] == [f"{sha}.onnx"]
    # A damaged cached file is not trusted: fetched again.
    (cache / f"{sha}.onnx").write_bytes(b"damaged")
    world.write_params_file()
    in_project = predict("--model", "production")  # the project's registry, from params.yaml
    assert in_project.returncode == 0, in_project.stderr
    assert (cache / f"{sha}.onnx").read_bytes() != b"damaged"


def test_resolve_refuses_a_file_that_does_not_match_its_sha256(world, tmp_path):
    candidate(world)
    registry = Registry(world().promote.registry, "classifier")
    (Path(registry.url) / "classifier/versions/1/model.onnx").write_bytes(b"swapped")
    with pytest.raises(RegistryError, match="versions/1/model.onnx: sha256 .* differs"):
        resolve(parse_ref(f"{registry.url}#classifier"), tmp_path / "cache")


def test_a_followed_model_moves_to_the_new_production_version(world):
    candidate(world)
    registry = Registry(world().promote.registry, "classifier")
    followed = FollowedModel(f"{registry.url}#classifier", poll_s=0.05)
    batch = np.ones((1, 3, 8, 8), dtype=np.float32)
    assert followed.probabilities(batch)[0] == 1 and not followed.refresh()
    candidate(world, scale=2.0, seed=1)
    followed.start()
    try:
        for _ in range(200):
            if followed.current.version == 2:
                break
            time.sleep(0.05)
    finally:
        followed.stop()
    version, probabilities = followed.probabilities(batch)
    assert version == 2 and probabilities.shape == (1, 3)


def test_promote_on_an_s3_registry(world, tmp_path, monkeypatch):
    with s3_server(tmp_path) as s3:
        for key, value in {**s3.env(), "AWS_ENDPOINT_URL": s3.endpoint}.items():
            monkeypatch.setenv(key, value)
        url = f"s3://{s3.bucket}/models"
        params = world(promote={"registry": url})
        colour_model(params.paths.onnx)
        assert promote.main(params)["decision"] == "first"
        colour_model(params.paths.onnx, seed=1)
        assert promote.main(params)["decision"] == "promoted"
        colour_model(params.paths.onnx, permute=1, seed=2)
        kept = promote.main(params)
        assert (kept["decision"], kept["version"], kept["production_version"]) == ("kept", 3, 2)
        keys = s3.keys()
        assert "models/classifier/aliases/production.json" in keys
        assert {f"models/classifier/versions/{n}/version.json" for n in (1, 2, 3)} <= keys
        assert "models/classifier/lock" not in keys  # released
        registry = Registry(url, "classifier")
        assert not registry.store.create("classifier/versions/1.claim", b"{}")  # If-None-Match
        resolved = resolve(parse_ref(f"{url}#classifier"), tmp_path / "cache")
        assert resolved.version == 2
        with registry.locked(10, 5):
            assert registry.rollback().version == 1
        assert FollowedModel(f"{url}#classifier").current.version == 1


@pytest.mark.slow
def test_models_the_pipeline_exported_first_promoted_kept(tmp_path, monkeypatch):
    """The stages' own files: Lite0 (ImageNet weights) and a head, exported with int8 and
    checked; then a head trained from another seed; then that file with its classes'
    scores rolled (wrong on every image)."""
    world = TinyWorld.build(
        tmp_path,
        monkeypatch,
        images=colour_images(tmp_path / "images"),
        model={"weights": "imagenet"},
        head={"epochs": 20, "patience": 20},
        finetune={"epochs": 0},
        export={"calibration_images": 30},
        onnx_check={"latency_runs": 5, "throughput_batches": 1},
        promote={"registry": str(tmp_path / "registry")},
    )
    world.run(features, train_head, finetune, evaluate, export, onnx_check)
    first = world.run(promote)
    assert (first["decision"], first["version"]) == ("first", 1)
    registry = Registry(world().promote.registry, "classifier")
    assert set(registry.version(1)["files"]) == {"model.onnx", "model.int8.onnx", "images.parquet"}

    world.run(train_head, finetune, evaluate, export, onnx_check, head={"seed": 1})
    second = world.run(promote, head={"seed": 1})
    assert (second["decision"], second["version"], second["production_version"]) == (
        "promoted",
        2,
        2,
    )
    assert second["images"] == TEST_IMAGES and second["left_out"] == 0
    assert second["challenger"]["top1"] >= 0.9 and second["champion"]["top1"] >= 0.9

    onnx_file = world().paths.onnx
    rolled(onnx_file, onnx_file)
    worse = world.run(promote, head={"seed": 1})
    assert (worse["decision"], worse["production_version"]) == ("kept", 2)
    assert worse["challenger"]["top1"] == 0.0 and worse["p_value"] < 0.05


def figures(lost: int, gained: int, both: int = 0) -> dict:
    """promote's figures for images where only the champion (lost), only the challenger
    (gained) or both (both) are right."""
    from pipeline.reporting.significance import PairedOutcome

    n = lost + gained + both
    return {
        **promote.NOTHING_COMPARED,
        "images": n,
        "champion_only_right": lost,
        "challenger_only_right": gained,
        "champion": {"top1": (lost + both) / n if n else None},
        "challenger": {"top1": (gained + both) / n if n else None},
        "p_value": PairedOutcome(n, lost, gained).worse_p_value(),
    }


@pytest.mark.parametrize(
    ("lost", "gained", "min_gain", "decision"),
    [
        (5, 0, None, "kept"),  # p = 1/32 < 0.05
        (4, 0, None, "promoted"),  # p = 1/16: no evidence on 4 images
        (9, 3, None, "promoted"),  # p = 0.073
        (10, 2, None, "kept"),  # p = 0.019
        (0, 0, None, "promoted"),  # nothing compared: no evidence either way
        (0, 0, 0.01, "kept"),  # ... and no gain shown
        (0, 3, 0.01, "promoted"),
    ],
)
def test_the_rule(lost, gained, min_gain, decision):
    cfg = params_with(promote={"min_gain": min_gain}).promote
    got, reason = promote.decide(figures(lost, gained, both=20 if lost + gained else 0), cfg, 4)
    assert got == decision, reason
    assert "\n" not in reason and ("version 4" in reason or "min_gain" in reason)


def test_the_docs_service_snippet_follows_production(world):
    """docs/registry.md's service, run as written against this registry."""
    text = (REPO_ROOT / "docs/registry.md").read_text(encoding="utf-8")
    snippet = text.split("without dropping a request:\n\n```python\n")[1].split("```")[0]
    candidate(world)
    url = f"{world().promote.registry}#classifier"
    namespace: dict = {}
    exec(snippet.replace("s3://bucket/models#classifier", url), namespace)  # noqa: S102
    model, handle = namespace["model"], namespace["handle"]
    try:
        red = sorted(str(p) for p in (world.images / "red").iterdir())[:4]
        assert handle(red) == (1, ["red"] * 4)
        candidate(world, seed=1)
        assert model.refresh()  # what its poll does every poll_s seconds
        assert handle(red) == (2, ["red"] * 4)
    finally:
        model.stop()
