"""The flow a work pool's worker runs: ``pipeline-stages``, some consecutive DVC stages of
one distributed run, in the worker's own clone, with the data coming from and going to
the default DVC remote.

prefect.yaml deploys it once per placement (``pipeline-stages/gpu`` on the GPU pool,
``pipeline-stages/cpu`` on the CPU pool); the orchestrating flow (``flows.pools``)
starts it with the run's commit and state, whose params.yaml gives the settings
(``flows.*``: timeouts, retries, the lock's patience). For each stage: check out its
inputs at the run's dvc.lock (pulling what the local cache lacks), ``dvc repro
--single-item --pull`` (DVC decides whether it runs), push its outputs and then its
run-cache entry. The run's new state and a record of where each stage ran go back as
artifacts of this flow run.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import Artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.databus import (
    RunState,
    added_bytes,
    cache_objects,
    check_out_inputs,
    check_out_run_commit,
    push_outputs,
)
from flows.dvcrun import (
    StageResult,
    reproduce_stage,
    retry_options,
    up_to_date,
    workspace_lock,
)
from pipeline.system.fsutil import read_json_or_empty, write_json_atomic

FLOW_NAME = "pipeline-stages"
STATE_ARTIFACT = "run-state"  # the artifact type the orchestrating flow reads back
PLACEMENT_ARTIFACT = "placement"  # where this flow run works, left before any stage


def this_pool() -> str:
    """The work pool this flow run was submitted to, as the Prefect server records it."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run.id).work_pool_name or "none"


def worker_name() -> str:
    return os.environ.get("PREFECT__WORKER_NAME", "unknown")  # set by the worker


@task(cache_policy=NO_CACHE)
def stage_here(
    stage: str,
    placement: str,
    workspace: str,
    cache_dir: str,
    runs_dir: str,
    run_log: str,
    timeout_s: float,
    pool: str,
    pulled: int,
) -> StageResult:
    """One stage on this worker: DVC's decision (``repro --pull``), and when it ran, its
    outputs and run-cache entry straight to the remote (a later crash keeps them).
    ``pulled``: the bytes its inputs took to arrive."""
    logger = get_run_logger()
    root = Path(workspace)

    def result(status: str, seconds: float, pulled: int, pushed: int | None) -> StageResult:
        where = (pool, worker_name(), socket.gethostname())
        return StageResult(stage, status, seconds, placement, *where, pulled, pushed)

    started = time.perf_counter()
    if up_to_date(root, stage):  # DVC's verdict without starting DVC again
        return result("up to date", round(time.perf_counter() - started, 2), pulled, None)
    before = cache_objects(Path(cache_dir))
    entries_before = cache_objects(Path(runs_dir))
    status, seconds = reproduce_stage(stage, root, timeout_s, pull=True, log=logger)
    pushed = None
    if status == "ran":
        # Its run-cache entry: the one the remote may lack (an entry DVC pulled in is there).
        entries = [Path(p) for p in cache_objects(Path(runs_dir)) if p not in entries_before]
        pushed = push_outputs(root, [stage], entries)[stage]
    else:  # what arrived in the cache came from the remote, not from the stage
        pulled += added_bytes(before, cache_objects(Path(cache_dir)))
    record = result(status, seconds, pulled, pushed)
    if status == "ran":  # before the next stage: the report shows where this one ran
        note_placement(root, run_log, record)
    return record


def note_placement(root: Path, run_log: str, record: StageResult) -> None:
    """Add where the stage ran and what it moved to its run log (the report shows it)."""
    path = root / run_log
    entry = read_json_or_empty(path)
    if entry:
        entry.update(
            pool=record.pool,
            worker=record.worker,
            host=record.host,
            pulled_bytes=record.pulled_bytes,
            pushed_bytes=record.pushed_bytes,
        )
        write_json_atomic(path, entry)


def run_group(
    root: Path, pool: str, stages: dict[str, str], incoming: RunState
) -> tuple[RunState, list[StageResult]]:
    """The stages in ``root`` (its stages.lock held): the run's state in, their inputs, each
    stage, the outputs out; timeouts and retries from the run's params (``flows.*``).
    Returns the run's state after them and a record per stage."""
    logger = get_run_logger()
    cfg, paths = incoming.settings()
    incoming.write(root)
    cache_dir, runs_dir, pulled = check_out_inputs(root, list(stages))
    records = []
    for stage, placement in stages.items():
        run = stage_here.with_options(
            name=stage, tags=[placement, pool], **retry_options(stage, cfg)
        )
        run_log = paths.run_log_file(stage).as_posix()
        args = (str(root), str(cache_dir), str(runs_dir), run_log, cfg.timeout_for(stage), pool)
        records.append(run(stage, placement, *args, pulled[stage]))
    # Up-to-date stages too: their outputs may never have left this machine.
    quiet = [r.stage for r in records if r.pushed_bytes is None]
    sent = push_outputs(root, quiet) if quiet else {}
    records = [
        dataclasses.replace(r, pushed_bytes=sent[r.stage]) if r.stage in sent else r
        for r in records
    ]
    for r in records:
        logger.info(
            "%s: %s in %.1f s on pool %s (worker %s, host %s); pulled %d B, pushed %d B",
            r.stage,
            r.status,
            r.seconds,
            pool,
            r.worker,
            r.host,
            r.pulled_bytes,
            r.pushed_bytes,
        )
    return RunState.read(root, list(incoming.files)), records


@flow(name=FLOW_NAME, log_prints=True)
def pipeline_stages(
    stages: dict[str, str],
    repository: str,
    commit: str,
    state: dict,
) -> None:
    """Run ``stages`` (name → placement, in order) of a distributed run in this worker's
    workspace, a clone of ``repository`` moved to ``commit``.

    ``state``: the run's RunState so far; its params.yaml (with the run's overrides) gives
    the settings: ``flows.timeouts_s``, ``flows.download_retries``, ``flows.retry_delay_s``,
    ``flows.lock_timeout_s`` and each stage's run log (``paths.run_log``).
    The workspace is the working directory prefect.yaml's pull step sets
    (``TRANSFER_PIPELINE_DIR``).
    """
    root = Path.cwd()
    pool = this_pool()
    # First: a run whose machine is lost can still be traced to its worker and host.
    Artifact(
        type=PLACEMENT_ARTIFACT,
        data={
            "pool": pool,
            "worker": worker_name(),
            "host": socket.gethostname(),
            "workspace": str(root),
        },
        description=f"Stages {', '.join(stages)} on pool {pool}, worker {worker_name()}",
    ).create()
    incoming = RunState.from_dict(state)
    cfg, _ = incoming.settings()  # only its sections: this code may predate the run's
    with workspace_lock(root, cfg.lock_timeout_s, name="stages.lock"):
        check_out_run_commit(root, repository, commit, incoming.paths())
        get_run_logger().info("workspace %s at %s: %s", root, commit[:12], ", ".join(stages))
        committed_params = (root / "params.yaml").read_text(encoding="utf-8")
        try:
            outgoing, records = run_group(root, pool, stages, incoming)
        finally:  # the next user of this clone finds its own params.yaml, not this run's
            (root / "params.yaml").write_text(committed_params, encoding="utf-8")
    create_table_artifact(
        [asdict(r) for r in records],
        description=f"Stages run on pool {pool} ({records[0].worker}, {records[0].host})",
    )
    Artifact(
        type=STATE_ARTIFACT,
        data={"state": outgoing.to_dict(), "records": [asdict(r) for r in records]},
        description="The run's state after these stages (read by the orchestrating flow)",
    ).create()
