"""The Prefect flow ``training-pipeline``: the DVC stages, run by DVC, watched by Prefect.

DVC is the one skip-decider: each task runs ``dvc repro --single-item <stage>`` in a
child process and reports whether DVC ran the stage or found it up to date. The stage
order comes from DVC's own graph of dvc.yaml, never from a copy here. Prefect adds
retries (``download`` only: the network is the one nondeterministic input), timeouts
that kill the stage's process, placement tags (``gpu``/``cpu``), a run summary artifact,
and schedules. A run with parameter overrides is saved as a DVC experiment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from ruamel.yaml import YAML

from pipeline.config import FlowsParams, Paths, load_params, parse_params
from pipeline.errors import ConfigError, PipelineError
from pipeline.reporting.headline import headline_markdown
from pipeline.system.verify import REPAIRED

FLOW_NAME = "training-pipeline"
ERROR_LINE = re.compile(r"(^ERROR[: ].*|\bERROR\b \S+: .*)")


class StageFailed(PipelineError):
    """A stage's process failed; the message is the stage's own error."""


class WorkspaceBusy(PipelineError):
    """Another flow run holds the workspace."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # "ran" or "up to date"
    seconds: float
    placement: str = "cpu"  # dvc.yaml's meta.placement for the stage


def dvc_stages(workspace: Path) -> dict[str, str]:
    """The stages of dvc.yaml in dependency order, from DVC's own graph, each with its
    placement (``meta.placement`` in dvc.yaml: ``gpu`` or ``cpu``)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        graph = repo.index.graph  # edges point from a stage to what it depends on
        stages = list(nx.topological_sort(graph.reverse(copy=True)))
        return {stage.addressing: (stage.meta or {}).get("placement", "cpu") for stage in stages}


def stage_order(workspace: Path) -> list[str]:
    """The stages of dvc.yaml in dependency order, from DVC's own graph."""
    return list(dvc_stages(workspace))


def child_env() -> dict[str, str]:
    """The stage's environment: this interpreter's tools first and the stages run by it
    (``bin/stage`` reads ``PIPELINE_PYTHON``), analytics off, a git identity.

    ``dvc exp save`` commits; where git has no identity configured, it falls back to one
    naming the flow rather than failing after the whole pipeline has run.
    """
    env = {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PIPELINE_PYTHON": sys.executable,
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
    }
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", "transfer-pipeline flow")
        env.setdefault(f"GIT_{role}_EMAIL", "flow@localhost")
    return env


def run_killable(args: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``args`` in its own process group; on timeout or interruption kill the whole group.

    Prefect's own timeouts cannot stop blocking code in a worker thread
    (PrefectHQ/prefect#15760), so the stage runs as a process this function can kill,
    together with the stage command DVC started under it. If this process is killed
    outright, the kernel kills the child (``pipeline.system.process``), and the stage follows.
    """
    proc = subprocess.Popen(
        # Through pipeline.system.process: killed by the kernel if this process dies (even SIGKILL).
        [sys.executable, "-m", "pipeline.system.process", "--", *args],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except BaseException:  # timeout, cancellation, Ctrl-C: never leave the stage running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, output, "")


def stage_error(output: str) -> str:
    """The stage's own error lines (the pipeline's ``ERROR`` log and DVC's ``ERROR:``)."""
    lines = [m.group(1).strip() for line in output.splitlines() if (m := ERROR_LINE.search(line))]
    return "\n".join(lines) if lines else "\n".join(output.strip().splitlines()[-15:])


def run_dvc(args: list[str], workspace: Path, timeout_s: float, what: str) -> str:
    """``dvc <args>`` in ``workspace``, killable; its output, or StageFailed naming ``what``."""
    done = run_killable([sys.executable, "-m", "dvc", *args], workspace, timeout_s)
    logger = get_run_logger()
    for line in done.stdout.splitlines():
        logger.debug("%s | %s", what, line)
    if done.returncode != 0:
        raise StageFailed(f"{what} failed (exit {done.returncode}): {stage_error(done.stdout)}")
    return done.stdout


@task
def reproduce(stage: str, workspace: str, timeout_s: float) -> StageResult:
    """``dvc repro --single-item <stage>``: DVC decides whether anything needs to run."""
    logger = get_run_logger()
    started = time.perf_counter()
    try:
        output = run_dvc(
            ["repro", "--single-item", stage], Path(workspace), timeout_s, f"stage {stage}"
        )
    except subprocess.TimeoutExpired:
        raise StageFailed(
            f"stage {stage} ran past flows.timeouts_s ({timeout_s:g} s) and was killed"
        ) from None
    seconds = round(time.perf_counter() - started, 2)
    ran = f"Running stage '{stage}'" in output
    status = "ran" if ran else "up to date"
    logger.info("%s: %s in %.1f s", stage, status, seconds)
    return StageResult(stage, status, seconds)


@task(name="verify", tags=["cpu"])
def verify_outputs(workspace: str, timeout_s: float) -> list[str]:
    """``python -m pipeline verify --repair`` before DVC trusts anything: damaged bytes in
    outputs or cache (which DVC's mtime-based state misses) are restored or recomputed."""
    logger = get_run_logger()
    done = run_killable(
        [sys.executable, "-m", "pipeline", "verify", "--repair"], Path(workspace), timeout_s
    )
    lines = [line.removeprefix("verify: ") for line in done.stdout.splitlines()]
    if done.returncode != 0:
        raise StageFailed(f"verify failed (exit {done.returncode}): {stage_error(done.stdout)}")
    repairs = [line.removeprefix(REPAIRED) for line in lines if line.startswith(REPAIRED)]
    for line in repairs:
        logger.warning("verify: %s", line)
    logger.info("verify: %s", lines[-1] if lines else "no output")
    return repairs


@contextlib.contextmanager
def workspace_lock(workspace: Path, timeout_s: float) -> Iterator[None]:
    """One flow run per workspace: a second waits up to ``timeout_s``, then is refused.

    An OS file lock, so a crashed run releases it with its process; DVC's own lock
    only guards one ``dvc`` command, and two runs interleaving stages would mix outputs.
    """
    path = workspace / ".dvc" / "tmp" / "flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "unknown"
                    raise WorkspaceBusy(
                        f"{workspace.resolve()} is in use by another flow run ({holder}); "
                        f"waited {timeout_s:g} s (flows.lock_timeout_s)"
                    ) from None
                time.sleep(1.0)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def params_overridden(workspace: Path, overrides: dict[str, Any]) -> Iterator[None]:
    """params.yaml with ``overrides`` (dotted keys) applied, restored afterwards.

    The overridden file is validated like any params file first, so a mistyped key fails
    before a stage runs. Comments and layout survive (ruamel round trip).
    """
    if not overrides:
        yield
        return
    path = workspace / "params.yaml"
    original = path.read_text(encoding="utf-8")
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
    try:
        path.write_text(buffer.getvalue(), encoding="utf-8")
        yield
    finally:
        path.write_text(original, encoding="utf-8")


def experiment_name(run_name: str | None) -> str:
    """A git-ref-safe experiment name from the flow run's name."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name or "run").strip("-") or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


@task(name="dvc-exp-save", tags=["cpu"])
def save_experiment(workspace: str, overrides: dict[str, Any], name: str) -> str:
    run_dvc(["exp", "save", "--force", "--name", name], Path(workspace), 600, "dvc exp save")
    get_run_logger().info("saved as DVC experiment %s with %s", name, overrides)
    return name


@task(name="dvc-push", tags=["cpu"], retries=2, retry_delay_seconds=[30, 120])
def push_outputs(workspace: str) -> None:
    """``dvc push``: outputs to the default DVC remote, for other machines to ``dvc pull``."""
    output = run_dvc(["push"], Path(workspace), 7200, "dvc push")
    get_run_logger().info("dvc push: %s", output.strip().splitlines()[-1:])


def summary_markdown(
    results: list[StageResult], paths: Paths, experiment: str | None, repairs: list[str]
) -> str:
    """The run's artifact: each stage's status and time, the run report's headline table.

    ``paths``: the workspace's, made absolute with ``Paths.under``.
    """
    lines = ["# training-pipeline run", ""]
    if repairs:
        lines += ["Damaged copies found and repaired before the run (`python -m pipeline verify`):"]
        lines += [f"- {line}" for line in repairs] + [""]
    if experiment:
        lines += [f"Saved as DVC experiment `{experiment}` (`dvc exp show`).", ""]
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
    overrides: dict[str, Any] | None = None, push: bool | None = None, workspace: str = "."
) -> list[dict]:
    """Reproduce the pipeline in ``workspace``; with ``overrides`` save it as a DVC experiment.

    ``overrides``: dotted params keys, e.g. ``{"head.lr": 0.0005}``. ``push``: ``dvc push``
    to the default remote at the end (default: ``flows.push`` in params.yaml).
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = Path(workspace).resolve()
    params = load_params(root / "params.yaml")
    cfg: FlowsParams = params.flows
    overrides = dict(overrides or {})
    results: list[StageResult] = []
    experiment = None
    with workspace_lock(root, cfg.lock_timeout_s), params_overridden(root, overrides):
        stages = dvc_stages(root)
        unknown = set(cfg.timeouts_s) - set(stages) - {"default", "verify"}
        if unknown:
            raise ConfigError(f"flows.timeouts_s names no stage of dvc.yaml: {sorted(unknown)}")
        logger.info("stages in DVC order: %s", " → ".join(f"{s} ({p})" for s, p in stages.items()))
        repairs = verify_outputs(str(root), cfg.timeout_for("verify"))
        for stage, placement in stages.items():
            network = stage == "download"
            run = reproduce.with_options(
                name=stage,
                tags=[placement],
                retries=cfg.download_retries if network else 0,
                retry_delay_seconds=[cfg.retry_delay_s * 2**i for i in range(cfg.download_retries)]
                if network
                else None,
            )
            result = run(stage, str(root), cfg.timeout_for(stage))
            results.append(dataclasses.replace(result, placement=placement))
        if overrides:
            experiment = save_experiment(str(root), overrides, experiment_name(flow_run.name))
    if cfg.push if push is None else push:
        push_outputs(str(root))
    publish(results, root, params.paths, experiment, repairs)
    return [r.__dict__ for r in results]
