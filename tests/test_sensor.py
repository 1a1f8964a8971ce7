"""The source sensor (flows/sensor.py) against a real Prefect server: it starts a run of
the training deployment only when the source changed, and only one."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.images import noise_image
from tests.support.prefect import make_repo, run

DEPLOYMENT = "training-pipeline/scheduled"
# The training deployment registered on the server without anything to run its runs: a
# run the sensor starts stays Scheduled, where the test can count it.
REGISTER = (
    "from flows.training import training_pipeline; "
    "training_pipeline.to_deployment(name='scheduled').apply()"
)


def _api(env: dict, path: str, body: dict | None = None):
    request = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _training_runs(env: dict) -> list[dict]:
    deployment = _api(env, f"/deployments/name/{DEPLOYMENT}")
    return _api(env, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})


def _sense(repo: Path, env: dict) -> str:
    done = run([sys.executable, "-m", "flows", "sense"], repo, env, 300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_sensor_starts_one_training_run_when_the_source_changed(server, images, tmp_path):
    source = shutil.copytree(images, tmp_path / "images")
    repo = make_repo(tmp_path / "repo", source)
    repro = run([sys.executable, "-m", "dvc", "repro", "download"], repo, server, 600)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    registered = run([sys.executable, "-c", REGISTER], repo, server, 300)
    assert registered.returncode == 0, registered.stderr[-3000:]
    before = len(_training_runs(server))  # the session's other tests may have made some

    assert _sense(repo, server) == "source-sensor: Completed unchanged"
    assert len(_training_runs(server)) == before

    noise_image(31337).save(source / "cat" / "arrived.png")
    assert _sense(repo, server) == "source-sensor: Completed started"
    runs = _training_runs(server)
    assert len(runs) == before + 1
    (started,) = [r for r in runs if "source-sensor" in r["tags"]]
    assert started["state_type"] == "SCHEDULED"

    # still changed, but a run is already due: no second one
    assert _sense(repo, server) == "source-sensor: Completed pending"
    assert len(_training_runs(server)) == before + 1


@pytest.mark.slow
def test_prefect_deploy_schedules_the_sensor_every_sensor_interval(server, images, tmp_path):
    """prefect.yaml's ``watch``: the interval is params.yaml's, written once."""
    repo = make_repo(tmp_path / "repo", images, flows={"sensor_interval_s": 120})
    pool = run(["prefect", "work-pool", "create", "cpu-pool", "--type", "process"], repo, server)
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stderr
    env = {**server, "TRANSFER_PIPELINE_DIR": str(repo)}
    deployed = run(["prefect", "--no-prompt", "deploy", "--name", "watch"], repo, env, 300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    deployment = _api(server, "/deployments/name/source-sensor/watch")
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["rrule"].endswith("\nFREQ=SECONDLY;INTERVAL=120")
    assert deployment["work_pool_name"] == "cpu-pool"
