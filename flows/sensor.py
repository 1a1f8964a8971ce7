"""The flow ``source-sensor``: the cheap check users schedule every few minutes.

It fingerprints ``data.source`` in the workspace (``pipeline.sources.fingerprint``: a
directory walk or a few requests) and asks what DVC would: does the record differ from the
one ``download`` last ran on (its ``paths.source_fingerprint`` dependency in dvc.lock)?
Only then, and only when no run of the training deployment is running or due within one
sensor period, does it start one (``run_deployment``, not waiting for it). DVC still decides
what that run reruns.

A sensor, not an event trigger: Prefect's triggers fire on events, and nothing emits an
event when files land in a folder or an S3 prefix; something has to look, and the run it
starts must agree with ``dvc repro`` about what changed, so it looks the way DVC does.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.training import FLOW_NAME
from pipeline.config import load_params
from pipeline.sources.fingerprint import fingerprint_text, source_fingerprint

SENSOR_FLOW = "source-sensor"
TRAINING_DEPLOYMENT = f"{FLOW_NAME}/scheduled"  # python -m flows serve's and prefect.yaml's
BUSY_STATES = ("RUNNING", "PENDING", "SCHEDULED", "PAUSED", "CANCELLING")


def locked_md5(workspace: Path, fingerprint_file: Path) -> str | None:
    """The md5 dvc.lock holds for ``fingerprint_file`` as download's dependency: the
    fingerprint download last ran on (None before its first run)."""
    try:
        lock = yaml.safe_load((workspace / "dvc.lock").read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return None
    deps = (lock.get("stages") or {}).get("download", {}).get("deps") or []
    wanted = fingerprint_file.as_posix()
    return next((d.get("md5") for d in deps if d.get("path") == wanted), None)


@task(name="fingerprint-source", cache_policy=NO_CACHE)
def source_changed(workspace: str) -> bool:
    """True when the source's fingerprint now differs from the one download last ran on."""
    root = Path(workspace).resolve()
    params = load_params(root / "params.yaml")
    record = source_fingerprint(params.data, params.download, root)
    now = hashlib.md5(fingerprint_text(record).encode("utf-8")).hexdigest()  # DVC's file md5
    last = locked_md5(root, params.paths.source_fingerprint)
    get_run_logger().info(
        "%s: fingerprint %s (%s), download last ran on %s",
        params.data.source,
        record["digest"][:12],
        "changed" if now != last else "unchanged",
        last or "nothing yet",
    )
    return now != last


@task(name="training-runs-pending", cache_policy=NO_CACHE)
def pending_runs(deployment: str, horizon_s: float) -> list[str]:
    """Names of ``deployment``'s runs that are running, or scheduled to start within
    ``horizon_s``: a new run would only queue behind them and find the work done."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    horizon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=horizon_s)
    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType(s) for s in BUSY_STATES])
                )
            ),
        )
    return [
        run.name
        for run in runs
        if run.state_type != StateType.SCHEDULED
        or run.expected_start_time is None
        or run.expected_start_time <= horizon
    ]


@task(name="start-training", cache_policy=NO_CACHE)
def start_training(deployment: str) -> str:
    """A run of ``deployment``, created now and not waited for; one per sensor run, even
    when the client resends a create request whose answer it lost."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    run = run_deployment(
        deployment,
        timeout=0,
        tags=[SENSOR_FLOW],
        as_subflow=False,
        idempotency_key=f"{SENSOR_FLOW}:{flow_run.id}:{flow_run.run_count}",
    )
    return run.name


@flow(name=SENSOR_FLOW)
def source_sensor(workspace: str = ".", deployment: str = TRAINING_DEPLOYMENT) -> str:
    """Start a run of ``deployment`` when ``data.source`` changed; returns what it did:
    ``unchanged``, ``pending`` (a run is already under way or due) or ``started``."""
    logger = get_run_logger()
    if not source_changed(workspace):
        return "unchanged"
    interval = load_params(Path(workspace) / "params.yaml").flows.sensor_interval_s
    pending = pending_runs(deployment, interval)
    if pending:
        logger.info("source changed; %s already pending: %s", deployment, ", ".join(pending))
        return "pending"
    name = start_training(deployment)
    logger.info("source changed: started %s run %s", deployment, name)
    return "started"
