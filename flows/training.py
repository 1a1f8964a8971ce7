"""The Prefect flow ``training-pipeline``: the DVC stages, run by DVC, watched by Prefect.

DVC is the one skip-decider: each stage is ``dvc repro --single-item <stage>`` in a child
process, which reports whether DVC ran the stage or found it up to date. The stage order
and each stage's placement (``meta.placement``: ``gpu`` or ``cpu``) come from DVC's own
graph of dvc.yaml, never from a copy here (``flows.dvcrun``). Prefect adds retries
(``download`` only: the network is the one nondeterministic input), timeouts that kill the
stage's process, a run summary artifact (``flows.summary``), and schedules; its result
caching stays off, so DVC's cache is the only one. A run with parameter overrides is saved
as a DVC experiment.

Two ways to run: here, every stage in this workspace (the default); or **distributed**
(``distributed=True``): each run of consecutive stages with one placement goes to the work
pool the setting ``flows.pools`` names for it (module ``flows/pools.py``), run there by
the flow ``pipeline-stages`` (``flows/stages.py``), with the data going through the default DVC
remote and the run's state (``flows.databus.RunState``) coming back to this workspace
after each of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.databus import RunState, check_out_run_commit, pull_outputs, run_commit
from flows.dvcrun import (
    DvcStage,
    StageResult,
    check_timeouts,
    dvc_stages,
    reproduce_stage,
    retry_options,
    run_dvc,
    verify_outputs,
    workspace_lock,
)
from flows.pools import run_on_pools
from flows.summary import publish
from pipeline.config import FlowsParams, Params, apply_overrides, load_params

FLOW_NAME = "training-pipeline"
# dvc push and pull: the remote is the network, as flaky as download's
TRANSFER_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [30, 120]}


@task(cache_policy=NO_CACHE)
def reproduce(stage: str, placement: str, workspace: str, timeout_s: float) -> StageResult:
    """``dvc repro --single-item <stage>``: DVC decides whether anything needs to run."""
    logger = get_run_logger()
    status, seconds = reproduce_stage(stage, Path(workspace), timeout_s, log=logger)
    logger.info("%s: %s in %.1f s", stage, status, seconds)
    return StageResult(stage, status, seconds, placement)


@task(name="dvc-exp-save", tags=["cpu"], cache_policy=NO_CACHE)
def save_experiment(workspace: str, overrides: dict[str, Any], name: str) -> str:
    run_dvc(
        ["exp", "save", "--force", "--name", name],
        Path(workspace),
        600,
        "dvc exp save",
        log=get_run_logger(),
    )
    get_run_logger().info("saved as DVC experiment %s with %s", name, overrides)
    return name


@task(name="dvc-push", tags=["cpu"], cache_policy=NO_CACHE, **TRANSFER_RETRIES)
def push_outputs(workspace: str) -> None:
    """``dvc push``: outputs to the default DVC remote, for other machines to ``dvc pull``."""
    output = run_dvc(["push"], Path(workspace), 7200, "dvc push", log=get_run_logger())
    get_run_logger().info("dvc push: %s", output.strip().splitlines()[-1:])


@task(name="dvc-pull", tags=["cpu"], cache_policy=NO_CACHE, **TRANSFER_RETRIES)
def pull_results(workspace: str) -> int:
    """``dvc pull``: a distributed run's outputs here (``flows.databus.pull_outputs``)."""
    return pull_outputs(Path(workspace), get_run_logger())


@contextlib.contextmanager
def params_overridden(workspace: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """params.yaml with ``overrides`` (dotted keys) applied, restored afterwards."""
    if not overrides:
        yield
        return
    path = workspace / "params.yaml"
    original = path.read_text(encoding="utf-8")
    text = apply_overrides(original, overrides)
    try:
        path.write_text(text, encoding="utf-8")
        yield
    finally:
        path.write_text(original, encoding="utf-8")


def experiment_name(run_name: str | None) -> str:
    """A git-ref-safe experiment name from the flow run's name."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name or "run").strip("-") or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name=FLOW_NAME, log_prints=True)
def training_pipeline(
    overrides: dict[str, Any] | None = None,
    push: bool | None = None,
    workspace: str = ".",
    distributed: bool = False,
) -> list[dict]:
    """Reproduce the pipeline in ``workspace``; with ``overrides`` save it as a DVC experiment.

    ``overrides``: dotted params keys, e.g. ``{"head.lr": 0.0005}``. ``push``: ``dvc push``
    to the default remote at the end (default: ``flows.push`` in params.yaml).
    ``distributed``: run the stages on the work pools ``flows.pools`` names (see above);
    the run ends with ``dvc pull`` here, so this workspace holds the run's outputs.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(workspace).resolve()
    params = load_params(root / "params.yaml")
    cfg: FlowsParams = params.flows
    overrides = dict(overrides or {})
    if overrides:  # a bad one fails now, naming its key, not after waiting for the workspace
        apply_overrides((root / "params.yaml").read_text(encoding="utf-8"), overrides)
    repairs: list[str] = []
    with workspace_lock(root, cfg.lock_timeout_s):
        stages = dvc_stages(root)
        check_timeouts(cfg, stages)
        logger.info(
            "stages in DVC order: %s", " → ".join(f"{s.name} ({s.placement})" for s in stages)
        )
        if distributed:
            results, experiment = run_distributed(root, stages, params, overrides, flow_run.name)
        else:
            # A pool's worker may share this folder (a `scheduled` deployment on a pool):
            # the stages here hold its stages.lock, as a worker's do.
            with (
                workspace_lock(root, cfg.lock_timeout_s, name="stages.lock"),
                params_overridden(root, overrides),
            ):
                results, repairs, experiment = run_here(root, stages, cfg, overrides, flow_run.name)
    if not distributed and (cfg.push if push is None else push):
        push_outputs(str(root))
    publish(results, root, params.paths, experiment, repairs)
    return [dataclasses.asdict(r) for r in results]


def run_here(
    root: Path, stages: list[DvcStage], cfg: FlowsParams, overrides: dict, run_name: str | None
) -> tuple[list[StageResult], list[str], str | None]:
    """Every stage in ``root``, one after the other (params already overridden)."""
    repairs = verify_outputs(str(root), cfg.timeout_for("verify"))
    results = []
    for stage in stages:
        run = reproduce.with_options(
            name=stage.name, tags=[stage.placement], **retry_options(stage.name, cfg)
        )
        results.append(run(stage.name, stage.placement, str(root), cfg.timeout_for(stage.name)))
    experiment = (
        save_experiment(str(root), overrides, experiment_name(run_name)) if overrides else None
    )
    return results, repairs, experiment


def run_distributed(
    root: Path,
    stages: list[DvcStage],
    params: Params,
    overrides: dict[str, Any],
    run_name: str | None,
) -> tuple[list[StageResult], str | None]:
    """The distributed run from ``root``: the stages on their pools (``flows.pools``), then
    the run's final state and outputs here (``dvc pull``), saved as an experiment when
    overridden."""
    original = (root / "params.yaml").read_text(encoding="utf-8")
    run_logs = [params.paths.run_log_file(s.name).as_posix() for s in stages]
    # with DVC's .gitignore entries: committing the run's state never commits its outputs
    files = sorted({o for s in stages for o in (*s.uncached_outs, *s.gitignores)} | set(run_logs))
    with workspace_lock(root, params.flows.lock_timeout_s, name="stages.lock"):
        state = RunState.read(root, files)
    state.params = apply_overrides(original, overrides) if overrides else original
    url, commit = run_commit(root, state.paths())
    results, state = run_on_pools(root, stages, state, url, commit)
    experiment = None
    with workspace_lock(root, params.flows.lock_timeout_s, name="stages.lock"):
        # A pool's worker may share this folder and have moved it to another run's commit.
        check_out_run_commit(root, url, commit, state.paths())
        state.write(root)
        try:
            pull_results(str(root))
            if overrides:
                experiment = save_experiment(str(root), overrides, experiment_name(run_name))
        finally:
            (root / "params.yaml").write_text(original, encoding="utf-8")
    return results, experiment
