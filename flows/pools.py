"""A distributed run's stages on the work pools, through Prefect's API: each run of
consecutive stages with one placement goes to the pool ``flows.pools`` names for it, as a
flow run of the deployment ``pipeline-stages/<placement>`` (``flows.stages``), with the
run's state (``flows.databus.RunState``) going with it and coming back. A pool's flow run
that fails is diagnosed from what the server recorded: the stage, pool, worker and host.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

from prefect import get_run_logger

from flows.databus import RunState, redacted
from flows.dvcrun import DvcStage, StageFailed, StageResult, workspace_lock
from flows.stages import FLOW_NAME as STAGES_FLOW
from flows.stages import PLACEMENT_ARTIFACT, STATE_ARTIFACT
from pipeline.errors import ConfigError


def pool_groups(stages: list[DvcStage], pools: dict[str, str]) -> list[list[DvcStage]]:
    """Consecutive stages with one placement: each run of them is one flow run on its pool,
    so a worker checks out, pulls and pushes once per run of stages it is given."""
    missing = sorted({s.placement for s in stages} - set(pools))
    if missing:
        raise ConfigError(
            f"flows.pools names no work pool for placement {', '.join(missing)} "
            f"(dvc.yaml's meta.placement); it has {sorted(pools)}"
        )
    return [list(group) for _, group in groupby(stages, key=lambda s: s.placement)]


def group_run_key(parent_id: str, attempt: int, deployment: str, names: list[str]) -> str:
    """The idempotency key of one run of stages: Prefect's client resends a create request
    whose answer it lost (a read timeout, a 503 while SQLite is locked), and without a key
    the server makes a second flow run that works the same stages beside the first."""
    return f"{parent_id}:{attempt}:{deployment}:{','.join(names)}"


def read_artifact(flow_run_id, kind: str) -> dict | None:
    """The data of the artifact of type ``kind`` a pool's flow run left, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    for artifact in artifacts:
        if artifact.type == kind:
            data = artifact.data
            return json.loads(data) if isinstance(data, str) else data
    return None


def read_run_state(flow_run_id) -> dict:
    """The ``run-state`` artifact a pool's flow run left: the state and its stage records."""
    found = read_artifact(flow_run_id, STATE_ARTIFACT)
    if found is None:
        raise StageFailed(f"flow run {flow_run_id} completed without its {STATE_ARTIFACT} artifact")
    return found


def online_workers(pool: str) -> int:
    """How many workers of ``pool`` the server has heard from lately."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except Exception:  # the pool itself missing: run_deployment says so
            return 0
    return sum(1 for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE"))


def failure_of(child, group: list[DvcStage]) -> str:
    """Which stage of a pool's flow run failed, on which pool and worker, and why."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id]))
        )
    names = [s.name for s in group]
    # Task states reach the server as events; a process that died may not have sent its
    # last ones, so the failed stage is the first of the group without a finished task.
    finished = {
        t.name.rsplit("-", 1)[0] for t in tasks if t.state is not None and t.state.is_completed()
    }
    stage = next((n for n in names if n not in finished), None)
    where = f"pool {child.work_pool_name}"
    # The pool's flow run says where it works before any stage; the worker also labels
    # the flow run it submits, which covers a run lost before its first artifact.
    placed = read_artifact(child.id, PLACEMENT_ARTIFACT) or {}
    worker = placed.get("worker") or (child.labels or {}).get("prefect.worker.name")
    if worker:
        where += f", worker {worker}"
    if placed.get("host"):
        where += f", host {placed['host']}"
    what = f"stage {stage}" if stage else f"stages {', '.join(names)}"
    state = child.state
    return (
        f"{what} on {where}: flow run {child.name} {state.name if state else 'lost'}"
        f"{': ' + state.message if state and state.message else ''}"
    )


def run_group_on_pool(group: list[DvcStage], pool: str, url: str, commit: str, state: RunState):
    """One run of same-placement stages as a flow run of ``pipeline-stages/<placement>``;
    the finished flow run, or StageFailed naming the stage, pool and worker."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    deployment = f"{STAGES_FLOW}/{group[0].placement}"
    names = [s.name for s in group]
    logger = get_run_logger()
    logger.info("%s → pool %s (%s)", ", ".join(names), pool, deployment)
    if not online_workers(pool):
        logger.warning(
            "no worker of pool %s is online: the run waits until one starts "
            "(`prefect worker start --pool %s` in a clone of this repository)",
            pool,
            pool,
        )
    try:
        child = run_deployment(
            deployment,
            parameters={
                "stages": {s.name: s.placement for s in group},
                "repository": url,
                "commit": commit,
                "state": state.to_dict(),
            },
            flow_run_name=f"{names[0]}…{names[-1]}" if len(names) > 1 else names[0],
            idempotency_key=group_run_key(flow_run.id, flow_run.run_count, deployment, names),
            poll_interval=1,
        )
    except Exception as exc:
        if type(exc).__name__ == "ObjectNotFound":
            raise ConfigError(
                f"no deployment {deployment} on the Prefect server: `prefect deploy --all` "
                "from this repository (prefect.yaml) creates it"
            ) from None
        if "Error creating flow run" in str(exc):  # the server checks the deployed schema
            raise ConfigError(
                f"the Prefect server's deployment {deployment} takes other parameters than "
                f"this code sends ({exc}): `prefect deploy --all` from this repository "
                "updates it"
            ) from None
        raise
    if child.state is None or not child.state.is_completed():
        raise StageFailed(failure_of(child, group))
    return child


def run_on_pools(
    root: Path, stages: list[DvcStage], state: RunState, url: str, commit: str
) -> tuple[list[StageResult], RunState]:
    """Each run of same-placement stages on its pool, in order, at ``url``'s ``commit``;
    ``state`` (the run's, params overridden: the workers' settings come from it) goes with
    each and comes back. After each, the state is written into ``root`` too (dvc.lock and
    the uncached outputs, not params), so a failed run leaves this workspace at its last
    finished stage, as ``dvc repro`` would. Every write into a workspace holds its
    ``stages.lock``: a pool worker may work in this very folder for another run.

    Returns each stage's record and the run's state after the last of them."""
    logger = get_run_logger()
    cfg, _ = state.settings()
    logger.info(
        "distributed run of %s at %s; stage data through the default DVC remote",
        redacted(url),
        commit[:12],
    )
    results: list[StageResult] = []
    for group in pool_groups(stages, cfg.pools):
        pool = cfg.pools[group[0].placement]
        child = run_group_on_pool(group, pool, url, commit, state)
        returned = read_run_state(child.id)
        state = RunState.from_dict(returned["state"])
        with workspace_lock(root, cfg.lock_timeout_s, name="stages.lock"):
            state.write(root, with_params=False)
        for record in returned["records"]:
            result = StageResult(**record)
            if result.pool != pool:
                logger.warning(
                    "%s ran on pool %s, but flows.pools says %s for %s: redeploy "
                    "(`prefect deploy --all`) after changing flows.pools",
                    result.stage,
                    result.pool,
                    pool,
                    group[0].placement,
                )
            results.append(result)
    return results, state
