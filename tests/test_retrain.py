"""Retraining as a user schedules it (issue 36's acceptance): a run sees new images, does the
data work only for them, promotes a model that is not worse, and keeps a worse one out of
production while the run still completes. Real Prefect server, real DVC, real onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.registry.store import Registry
from tests.support.images import colour_images
from tests.support.prefect import latest_artifact, make_repo, run_deployment, served
from tests.support.project import git, set_params

# make test: one worker runs the whole module (it shares the session's Prefect server)
pytestmark = [pytest.mark.slow, pytest.mark.one_worker]

# Colour-coded classes: even a random backbone's features separate them, so a model that
# learnt them and one that did not differ on the 18 test images by far more than chance.
PER_CLASS = 30
ADDED = 4  # images added to each of two classes between runs
WORSE = {"head": {"epochs": 1, "lr": 1e-5}, "finetune": {"epochs": 0}}


def metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def test_a_served_deployment_retrains_on_new_images_and_keeps_a_worse_model_out(server, tmp_path):
    images = colour_images(tmp_path / "images", per_class=PER_CLASS)
    repo = make_repo(tmp_path / "repo", images)

    def scheduled_run() -> dict:
        done = run_deployment(repo, server)
        assert done.returncode == 0 and "Completed" in done.stdout, (
            done.stdout[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
        )
        return metrics(repo, "promote")

    with served(repo, server, tmp_path / "serve.log"):
        first = scheduled_run()
        assert (first["decision"], first["version"], first["production_version"]) == (
            "first",
            1,
            1,
        )

        colour_images(images, per_class=ADDED, start=PER_CLASS, classes=("red", "green"))
        second = scheduled_run()
        assert metrics(repo, "download")["files"] == 3 * PER_CLASS + 2 * ADDED
        # only the new images were decoded and embedded
        assert metrics(repo, "validate")["decoded"] == 2 * ADDED
        assert metrics(repo, "features")["computed"] == 2 * ADDED
        assert (second["decision"], second["version"], second["champion_version"]) == (
            "promoted",
            2,
            1,
        )
        assert second["production_version"] == 2
        for model in ("champion", "challenger"):
            assert 0.9 <= second[model]["top1"] <= 1.0, second
            assert 0.9 <= second[model]["mean_class_accuracy"] <= 1.0, second
        assert second["images"] + second["left_out"] == metrics(repo, "split")["counts"]["test"]

        set_params(repo, **WORSE)
        git(repo, "commit", "-qam", "a change that makes the model worse")
        third = scheduled_run()
        assert (third["decision"], third["version"], third["production_version"]) == (
            "kept",
            3,
            2,
        )
        assert third["p_value"] < 0.05 and third["champion_only_right"] > 0, third
        assert third["reason"].startswith("worse than version 2"), third
        summary = latest_artifact(repo, server, "training-pipeline-summary")
        assert f"not promoted: {third['reason']}" in summary, summary
        assert "not promoted" in (repo / "reports/index.html").read_text()

    registry = Registry(str(repo / "registry"), "classifier")
    assert registry.alias("production").version == 2
    assert registry.versions() == [1, 2, 3]
