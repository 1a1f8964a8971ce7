"""Retraining as a user schedules it (issue 36's acceptance): a run sees new images, does the
data work only for them, promotes a model that is not worse, and keeps a worse one out of
production while the run still completes. Real Prefect server, real DVC, real onnxruntime."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.images import load_rgb
from pipeline.registry.store import Registry
from pipeline.serving.followed import FollowedModel
from pipeline.serving.predict import OnnxClassifier
from tests.support.images import colour_images
from tests.support.prefect import (
    latest_artifact,
    make_repo,
    run_deployment,
    served,
)
from tests.support.project import dvc, git, set_params
from tests.support.s3 import s3_server

# each test builds its own project; the Prefect server is the worker's session one
pytestmark = pytest.mark.slow

# Colour-coded classes: even a random backbone's features separate them, so a model that
# learnt them and one that did not differ on the 18 test images by far more than chance.
PER_CLASS = 30
ADDED = 4  # images added to each of two classes between runs
# the flow tests' 5 head epochs can leave the head at chance on these: 30 learn them every time
LEARNT = {"head": {"epochs": 30, "lr": 0.003}}
WORSE = {"head": {"epochs": 1, "lr": 1e-5}, "finetune": {"epochs": 0}}


def metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def test_a_served_deployment_retrains_on_new_images_and_keeps_a_worse_model_out(server, tmp_path):
    """Three runs of the served deployment: first, after new images, after a worse change."""
    images = colour_images(tmp_path / "images", per_class=PER_CLASS)
    repo = make_repo(tmp_path / "repo", images, **LEARNT)

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


def upload(s3, folder: Path, prefix: str) -> None:
    client = s3.client()
    for path in sorted(folder.rglob("*.png")):
        key = f"{prefix}{path.relative_to(folder).as_posix()}"
        client.upload_file(str(path), s3.bucket, key)


def test_an_s3_source_and_registry_with_a_service_that_follows_production(tmp_path, monkeypatch):
    """Objects added to the bucket between runs are trained on; a running service moves
    from version 1 to 2 by itself, and each of its answers is one whole version's. The runs
    are `dvc repro`: the Prefect path of the same loop is the served test's above."""
    (tmp_path / "s3").mkdir()
    with s3_server(tmp_path / "s3") as s3:
        aws = {**s3.env(), "AWS_ENDPOINT_URL": s3.endpoint}
        for key, value in aws.items():
            monkeypatch.setenv(key, value)  # DVC's stages and the service read these
        images = colour_images(tmp_path / "images", per_class=PER_CLASS)
        upload(s3, images, "images/")
        repo = make_repo(tmp_path / "repo", images, **LEARNT)
        registry_url = f"s3://{s3.bucket}/registry"
        set_params(
            repo, data={"source": f"s3://{s3.bucket}/images/"}, promote={"registry": registry_url}
        )
        git(repo, "commit", "-qam", "images and registry in the bucket")

        def scheduled_run() -> dict:
            dvc(repo, "repro")
            return metrics(repo, "promote")

        assert scheduled_run()["decision"] == "first"

        service = FollowedModel(f"{registry_url}#classifier", poll_s=0.2, threads=1)
        pre = service.current.model.contract.preprocessing
        batch = np.stack([pre(load_rgb(p)) for p in sorted(images.rglob("*.png"))[::9]])
        answers: list[tuple[int, np.ndarray]] = []
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                served = service.current  # what a request does: one model for its work
                answers.append((served.version, served.model.logits(batch)))
                time.sleep(0.02)  # a steady stream of requests, leaving the run its cores

        service.start()
        requests = threading.Thread(target=serve)
        requests.start()
        try:
            colour_images(tmp_path / "more", per_class=ADDED, start=PER_CLASS, classes=("blue",))
            upload(s3, tmp_path / "more", "images/")
            second = scheduled_run()
            assert (second["decision"], second["version"]) == ("promoted", 2), second
            assert metrics(repo, "download")["taken"]["fetched"] == ADDED
            assert metrics(repo, "validate")["decoded"] == ADDED
            deadline = time.monotonic() + 60
            while service.current.version != 2:
                assert time.monotonic() < deadline, "the service never moved to version 2"
                time.sleep(0.2)
            time.sleep(1)  # answers from version 2 too
        finally:
            stop.set()
            requests.join()
            service.stop()

        versions = [version for version, _ in answers]
        assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions)
        registry = Registry(registry_url, "classifier")
        for version in (1, 2):  # each answer is exactly what that version's own file gives
            sha256 = registry.version(version)["files"]["model.onnx"]["sha256"]
            onnx = registry.fetch(version, "model.onnx", sha256, tmp_path / f"v{version}.onnx")
            own = OnnxClassifier(onnx).logits(batch)
            for answered in (probs for v, probs in answers if v == version):
                np.testing.assert_allclose(answered, own, rtol=0, atol=1e-5)
        assert (
            np.abs(
                OnnxClassifier(tmp_path / "v1.onnx").logits(batch)
                - OnnxClassifier(tmp_path / "v2.onnx").logits(batch)
            ).max()
            > 1e-4
        )  # two different models, so a mixed-up answer would show
