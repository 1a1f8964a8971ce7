"""The Prefect flow ``training-pipeline``: the DVC stages, run by DVC, watched by Prefect.

DVC is the one skip-decider: each stage is ``dvc repro --single-item <stage>`` in a child
process, which reports whether DVC ran the stage or found it up to date. The stage order
and each stage's placement (``meta.placement``: ``gpu`` or ``cpu``) come from DVC's own
graph of dvc.yaml, never from a copy here. Prefect adds retries (``download`` only: the
network is the one nondeterministic input), timeouts that kill the stage's process, a
run summary artifact, and schedules. A run with parameter overrides is saved as a DVC
experiment.

Two ways to run: here, every stage in this workspace (the default); or **distributed**
(``distributed=True``): each run of consecutive stages with one placement goes to the work
pool ``flows.pools`` names for it, as a run of the deployment ``pipeline-stages/<placement>``
(``flows.stages``), with the data going through the default DVC remote and the run's
state (``flows.databus.RunState``) coming back to this workspace after each of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from itertools import groupby
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from ruamel.yaml import YAML

from flows.databus import (
    RunState,
    added_bytes,
    cache_objects,
    check_out_run_commit,
    default_remote,
    redacted,
    run_commit,
)
from flows.dvcrun import (
    StageFailed,
    StageResult,
    reproduce_stage,
    run_dvc,
    verify_outputs,
    workspace_lock,
)
from pipeline.config import FlowsParams, Paths, load_params, parse_params
from pipeline.errors import ConfigError
from pipeline.reporting.headline import headline_markdown

FLOW_NAME = "training-pipeline"
STAGES_FLOW = "pipeline-stages"  # flows.stages.FLOW_NAME (crash detection needs it unimported)


@dataclass(frozen=True)
class DvcStage:
    name: str
    placement: str  # dvc.yaml's meta.placement: gpu or cpu
    uncached_outs: tuple[str, ...]  # outputs DVC leaves to git (metrics and the like)
    gitignores: tuple[str, ...] = ()  # the .gitignore files DVC keeps its outputs out of git in


def dvc_stages(workspace: Path) -> list[DvcStage]:
    """The stages of dvc.yaml in dependency order, from DVC's own graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph  # edges point from a stage to what it depends on
        return [
            DvcStage(
                stage.addressing,
                (stage.meta or {}).get("placement", "cpu"),
                tuple(
                    Path(out.fs_path).relative_to(workspace.resolve()).as_posix()
                    for out in stage.outs
                    if not out.use_cache
                ),
                tuple(
                    (
                        Path(out.fs_path).relative_to(workspace.resolve()).parent / ".gitignore"
                    ).as_posix()
                    for out in stage.outs
                    if out.use_cache
                ),
            )
            for stage in nx.topological_sort(graph.reverse(copy=True))
        ]


def stage_order(workspace: Path) -> list[str]:
    """The stages of dvc.yaml in dependency order, from DVC's own graph."""
    return [stage.name for stage in dvc_stages(workspace)]


@task
def reproduce(stage: str, placement: str, workspace: str, timeout_s: float) -> StageResult:
    """``dvc repro --single-item <stage>``: DVC decides whether anything needs to run."""
    logger = get_run_logger()
    status, seconds = reproduce_stage(stage, Path(workspace), timeout_s, log=logger)
    logger.info("%s: %s in %.1f s", stage, status, seconds)
    return StageResult(stage, status, seconds, placement)


def overridden(original: str, overrides: dict[str, Any]) -> str:
    """params.yaml's text with ``overrides`` (dotted keys) applied, validated like any params
    file, so a mistyped key fails before a stage runs. Comments and layout survive (ruamel
    round trip)."""
    round_trip = YAML()
    data = round_trip.load(original)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"override {dotted!r}: no section {part!r} in params.yaml")
            node = node[part]
        node[leaf] = value
    buffer = StringIO()
    round_trip.dump(data, buffer)
    parse_params(yaml.safe_load(buffer.getvalue()))  # raises ConfigError naming the key
    return buffer.getvalue()


@contextlib.contextmanager
def params_overridden(workspace: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """params.yaml with ``overrides`` (dotted keys) applied, restored afterwards."""
    if not overrides:
        yield
        return
    path = workspace / "params.yaml"
    original = path.read_text(encoding="utf-8")
    text = overridden(original, overrides)
    try:
        path.write_text(text, encoding="utf-8")
        yield
    finally:
        path.write_text(original, encoding="utf-8")


def experiment_name(run_name: str | None) -> str:
    """A git-ref-safe experiment name from the flow run's name."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name or "run").strip("-") or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


@task(name="dvc-exp-save", tags=["cpu"])
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


@task(name="dvc-push", tags=["cpu"], retries=2, retry_delay_seconds=[30, 120])
def push_outputs(workspace: str) -> None:
    """``dvc push``: outputs to the default DVC remote, for other machines to ``dvc pull``."""
    output = run_dvc(["push"], Path(workspace), 7200, "dvc push", log=get_run_logger())
    get_run_logger().info("dvc push: %s", output.strip().splitlines()[-1:])


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
    from flows.stages import STATE_ARTIFACT

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

    from flows.stages import PLACEMENT_ARTIFACT

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


def run_on_pools(
    root: Path, stages: list[DvcStage], params, state: RunState
) -> tuple[list[StageResult], RunState]:
    """Each run of same-placement stages as a flow run of ``pipeline-stages/<placement>``
    on its pool, in order; ``state`` (the run's, params overridden) goes with each and
    comes back. After each, the state is written into ``root`` too (dvc.lock and the
    uncached outputs, not params), so a failed run leaves this workspace at its last
    finished stage, as ``dvc repro`` would. Every write into a workspace holds its
    ``stages.lock``: a pool worker may work in this very folder for another run."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    cfg: FlowsParams = params.flows
    run_logs = {s.name: params.paths.run_log_file(s.name).as_posix() for s in stages}
    url, commit = run_commit(root, state.paths())
    logger.info(
        "distributed run of %s at %s; stage data through the default DVC remote",
        redacted(url),
        commit[:12],
    )
    results: list[StageResult] = []
    for group in pool_groups(stages, cfg.pools):
        placement = group[0].placement
        deployment = f"{STAGES_FLOW}/{placement}"
        names = [s.name for s in group]
        logger.info("%s → pool %s (%s)", ", ".join(names), cfg.pools[placement], deployment)
        if not online_workers(cfg.pools[placement]):
            logger.warning(
                "no worker of pool %s is online: the run waits until one starts "
                "(`prefect worker start --pool %s` in a clone of this repository)",
                cfg.pools[placement],
                cfg.pools[placement],
            )
        try:
            child = run_deployment(
                deployment,
                parameters={
                    "stages": {s.name: s.placement for s in group},
                    "repository": url,
                    "commit": commit,
                    "state": state.to_dict(),
                    "run_logs": {n: run_logs[n] for n in names},
                    "timeouts_s": cfg.timeouts_s,
                    "lock_timeout_s": cfg.lock_timeout_s,
                    "download_retries": cfg.download_retries,
                    "retry_delay_s": cfg.retry_delay_s,
                },
                flow_run_name=f"{names[0]}…{names[-1]}" if len(names) > 1 else names[0],
                poll_interval=1,
            )
        except Exception as exc:
            if type(exc).__name__ == "ObjectNotFound":
                raise ConfigError(
                    f"no deployment {deployment} on the Prefect server: `prefect deploy --all` "
                    "from this repository (prefect.yaml) creates it"
                ) from None
            raise
        if child.state is None or not child.state.is_completed():
            raise StageFailed(failure_of(child, group))
        returned = read_run_state(child.id)
        state = RunState.from_dict(returned["state"])
        with workspace_lock(root, cfg.lock_timeout_s, name="stages.lock"):
            state.write(root, with_params=False)
        for record in returned["records"]:
            result = StageResult(**record)
            if result.pool != cfg.pools[placement]:
                logger.warning(
                    "%s ran on pool %s, but flows.pools says %s for %s: redeploy "
                    "(`prefect deploy --all`) after changing flows.pools",
                    result.stage,
                    result.pool,
                    cfg.pools[placement],
                    placement,
                )
            results.append(result)
    return results, state, (url, commit)


def run_distributed(
    root: Path, stages: list[DvcStage], overrides: dict[str, Any], run_name: str | None
) -> tuple[list[StageResult], str | None]:
    """The distributed run from ``root``: the stages on their pools, then the run's final
    state and outputs here (``dvc pull``), saved as an experiment when overridden."""
    params = load_params(root / "params.yaml")
    original = (root / "params.yaml").read_text(encoding="utf-8")
    run_logs = [params.paths.run_log_file(s.name).as_posix() for s in stages]
    # with DVC's .gitignore entries: committing the run's state never commits its outputs
    files = sorted({o for s in stages for o in (*s.uncached_outs, *s.gitignores)} | set(run_logs))
    with workspace_lock(root, params.flows.lock_timeout_s, name="stages.lock"):
        state = RunState.read(root, files)
    state.params = overridden(original, overrides) if overrides else original
    results, state, (url, commit) = run_on_pools(
        root, stages, parse_params(yaml.safe_load(state.params)), state
    )
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


@task(name="dvc-pull", tags=["cpu"], retries=2, retry_delay_seconds=[30, 120])
def pull_results(workspace: str) -> int:
    """``dvc pull``: the run's outputs into the orchestrating workspace, so that its
    dvc.lock and outputs agree (``dvc status`` clean); the bytes fetched."""
    from dvc.repo import Repo

    root = Path(workspace)
    with Repo(str(root)) as repo:
        cache_dir = Path(repo.cache.local.path)
        if not repo.status():  # this workspace already holds the run's outputs
            return 0
    before = cache_objects(cache_dir)
    try:
        run_dvc(["pull", "--force"], root, 7200, "dvc pull", log=get_run_logger())
    except StageFailed as exc:
        with Repo(str(root)) as repo:
            raise StageFailed(
                f"pulling the run's outputs from {default_remote(repo)}: {exc}"
            ) from exc
    pulled = added_bytes(before, cache_objects(cache_dir))
    get_run_logger().info("dvc pull: %d B into %s", pulled, root)
    return pulled


def human_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def summary_markdown(
    results: list[StageResult], paths: Paths, experiment: str | None, repairs: list[str]
) -> str:
    """The run's artifact: each stage's status, time and place, the report's headline table.

    ``paths``: the workspace's, made absolute with ``Paths.under``.
    """
    lines = ["# training-pipeline run", ""]
    if repairs:
        lines += ["Damaged copies found and repaired before the run (`python -m pipeline verify`):"]
        lines += [f"- {line}" for line in repairs] + [""]
    if experiment:
        lines += [f"Saved as DVC experiment `{experiment}` (`dvc exp show`).", ""]
    if any(r.pool for r in results):
        lines += [
            "| stage | placement | pool | worker | host | status | seconds | pulled | pushed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.stage} | {r.placement} | {r.pool} | {r.worker} | {r.host} | {r.status} "
            f"| {r.seconds:.1f} | {human_bytes(r.pulled_bytes)} | {human_bytes(r.pushed_bytes)} |"
            for r in results
        ]
    else:
        lines += ["| stage | placement | status | seconds |", "|---|---|---|---|"]
        lines += [f"| {r.stage} | {r.placement} | {r.status} | {r.seconds:.1f} |" for r in results]
    lines += ["", headline_markdown(paths), ""]
    lines.append(f"ONNX model: `{paths.onnx}`")
    if paths.report.exists():
        lines.append(f"Run report: `{paths.report}`")
    return "\n".join(lines) + "\n"


def publish(
    results: list[StageResult],
    workspace: Path,
    paths: Paths,
    experiment: str | None,
    repairs: list[str],
) -> None:
    """The summary as a markdown artifact; the HTML report, where it exists, as a link.

    ``paths``: as in params.yaml, relative to ``workspace``.
    """
    absolute = paths.under(workspace)
    create_markdown_artifact(
        summary_markdown(results, absolute, experiment, repairs),
        key="training-pipeline-summary",
        description="Stages, headline figures and the model of this run",
    )
    if absolute.report.exists():
        create_link_artifact(
            absolute.report.as_uri(),
            link_text=str(paths.report),
            key="training-pipeline-report",
            description="This run's HTML report (a file on the machine that ran the flow)",
        )


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
    results: list[StageResult] = []
    experiment = None
    repairs: list[str] = []
    with workspace_lock(root, cfg.lock_timeout_s):
        stages = dvc_stages(root)
        unknown = set(cfg.timeouts_s) - {s.name for s in stages} - {"default", "verify"}
        if unknown:
            raise ConfigError(f"flows.timeouts_s names no stage of dvc.yaml: {sorted(unknown)}")
        logger.info(
            "stages in DVC order: %s", " → ".join(f"{s.name} ({s.placement})" for s in stages)
        )
        if distributed:
            results, experiment = run_distributed(root, stages, overrides, flow_run.name)
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
    results = []
    repairs = verify_outputs(str(root), cfg.timeout_for("verify"))
    for stage in stages:
        network = stage.name == "download"
        run = reproduce.with_options(
            name=stage.name,
            tags=[stage.placement],
            retries=cfg.download_retries if network else 0,
            retry_delay_seconds=[cfg.retry_delay_s * 2**i for i in range(cfg.download_retries)]
            if network
            else None,
        )
        results.append(run(stage.name, stage.placement, str(root), cfg.timeout_for(stage.name)))
    experiment = (
        save_experiment(str(root), overrides, experiment_name(run_name)) if overrides else None
    )
    return results, repairs, experiment
