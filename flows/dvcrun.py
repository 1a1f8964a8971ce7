"""Running DVC from a flow: the stages and their placement from DVC's own graph, killable
child processes, the stage's own error, one run per workspace, and what ``dvc repro`` said
it did. Shared by the orchestrating flow (``flows.training``) and the flow a work pool's
worker runs (``flows.stages``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import FlowsParams
from pipeline.errors import ConfigError, PipelineError

ERROR_LINE = re.compile(r"(^ERROR[: ].*|\bERROR\b \S+: .*)")
NETWORK_STAGE = "download"  # the one stage with a nondeterministic input: retried


class StageFailed(PipelineError):
    """A stage's process failed; the message is the stage's own error."""


class WorkspaceBusy(PipelineError):
    """Another flow run holds the workspace."""


@dataclass(frozen=True)
class StageResult:
    """How one stage of a run went, and where: ``pool`` is the work pool of a distributed
    run's stage ("" when the whole run is one process here), with its worker and host and
    the bytes it fetched from and sent to the DVC remote (None when nothing moved)."""

    stage: str
    status: str  # "ran" or "up to date"
    seconds: float
    placement: str = "cpu"  # dvc.yaml's meta.placement for the stage
    pool: str = ""
    worker: str = ""
    host: str = ""
    pulled_bytes: int | None = None
    pushed_bytes: int | None = None


@dataclass(frozen=True)
class DvcStage:
    name: str
    placement: str  # dvc.yaml's meta.placement: gpu or cpu
    uncached_outs: tuple[str, ...]  # outputs DVC leaves to git (metrics and the like)
    gitignores: tuple[str, ...] = ()  # the .gitignore files DVC keeps its outputs out of git in


def dvc_stages(workspace: Path) -> list[DvcStage]:
    """The stages of dvc.yaml in dependency order, from DVC's own graph; among the stages
    the graph leaves free, in dvc.yaml's order, so a CPU stage listed after the GPU ones
    (data_issues) does not split the GPU pool's run in two."""
    import networkx as nx
    from dvc.repo import Repo

    root = workspace.resolve()
    with Repo(str(workspace)) as repo:
        graph = repo.index.graph  # edges point from a stage to what it depends on
        listed = {stage.addressing: n for n, stage in enumerate(repo.index.stages)}
        return [
            DvcStage(
                stage.addressing,
                (stage.meta or {}).get("placement", "cpu"),
                tuple(
                    Path(out.fs_path).relative_to(root).as_posix()
                    for out in stage.outs
                    if not out.use_cache
                ),
                tuple(
                    (Path(out.fs_path).relative_to(root).parent / ".gitignore").as_posix()
                    for out in stage.outs
                    if out.use_cache
                ),
            )
            for stage in nx.lexicographical_topological_sort(
                graph.reverse(copy=True), key=lambda stage: listed[stage.addressing]
            )
        ]


def stage_order(workspace: Path) -> list[str]:
    """The stages of dvc.yaml in dependency order, from DVC's own graph."""
    return [stage.name for stage in dvc_stages(workspace)]


def check_timeouts(cfg: FlowsParams, stages: list[DvcStage]) -> None:
    """``flows.timeouts_s`` names only stages of dvc.yaml (a typo would silently fall back
    to the default)."""
    unknown = set(cfg.timeouts_s) - {s.name for s in stages} - {"default", "verify"}
    if unknown:
        raise ConfigError(f"flows.timeouts_s names no stage of dvc.yaml: {sorted(unknown)}")


def retry_options(stage: str, cfg: FlowsParams) -> dict:
    """A stage task's Prefect retries: ``flows.download_retries`` for the network stage,
    the delay doubling from ``flows.retry_delay_s``; none for the deterministic stages."""
    if stage != NETWORK_STAGE:
        return {"retries": 0, "retry_delay_seconds": None}
    delays = [cfg.retry_delay_s * 2**i for i in range(cfg.download_retries)]
    return {"retries": cfg.download_retries, "retry_delay_seconds": delays}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
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
        **(extra or {}),
    }
    for role in ("AUTHOR", "COMMITTER"):
        env.setdefault(f"GIT_{role}_NAME", "transfer-pipeline flow")
        env.setdefault(f"GIT_{role}_EMAIL", "flow@localhost")
    return env


def run_killable(
    args: list[str], cwd: Path, timeout_s: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
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
        env=child_env(env),
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


def run_dvc(
    args: list[str],
    workspace: Path,
    timeout_s: float,
    what: str,
    env: dict[str, str] | None = None,
    log=None,
) -> str:
    """``dvc <args>`` in ``workspace``, killable; its output, or StageFailed naming ``what``."""
    done = run_killable([sys.executable, "-m", "dvc", *args], workspace, timeout_s, env)
    if log is not None:
        for line in done.stdout.splitlines():
            log.debug("%s | %s", what, line)
    if done.returncode != 0:
        raise StageFailed(f"{what} failed (exit {done.returncode}): {stage_error(done.stdout)}")
    return done.stdout


def repro_status(stage: str, output: str) -> str:
    """``ran`` when DVC ran the stage's command, else ``up to date`` (unchanged, or its
    outputs checked out from the cache, the run cache or the remote)."""
    return "ran" if f"Running stage '{stage}'" in output else "up to date"


def up_to_date(workspace: Path, stage: str) -> bool:
    """DVC's own verdict (``dvc status <stage>``, in this process: no DVC start-up to pay):
    deps, params, command and outputs all as dvc.lock records them."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return not repo.status(targets=[stage])


def reproduce_stage(
    stage: str,
    workspace: Path,
    timeout_s: float,
    pull: bool = False,
    env: dict[str, str] | None = None,
    log=None,
) -> tuple[str, float]:
    """``dvc repro --single-item <stage>`` (``--pull``: missing inputs, outputs and run-cache
    entries come from the default remote): DVC decides whether anything runs.
    Returns the status and the seconds it took."""
    started = time.perf_counter()
    args = ["repro", "--single-item", *(["--pull"] if pull else []), stage]
    try:
        output = run_dvc(args, workspace, timeout_s, f"stage {stage}", env, log)
    except subprocess.TimeoutExpired:
        raise StageFailed(
            f"stage {stage} ran past flows.timeouts_s ({timeout_s:g} s) and was killed"
        ) from None
    return repro_status(stage, output), round(time.perf_counter() - started, 2)


def verify_and_repair(workspace: Path, timeout_s: float, log) -> list[str]:
    """``python -m pipeline verify --repair`` before DVC trusts anything: damaged bytes in
    outputs or cache (which DVC's mtime-based state misses) are restored or recomputed.
    Returns the repairs made."""
    from pipeline.system.verify import REPAIRED

    done = run_killable(
        [sys.executable, "-m", "pipeline", "verify", "--repair"], workspace, timeout_s
    )
    lines = [line.removeprefix("verify: ") for line in done.stdout.splitlines()]
    if done.returncode != 0:
        raise StageFailed(f"verify failed (exit {done.returncode}): {stage_error(done.stdout)}")
    repairs = [line.removeprefix(REPAIRED) for line in lines if line.startswith(REPAIRED)]
    for line in repairs:
        log.warning("verify: %s", line)
    log.info("verify: %s", lines[-1] if lines else "no output")
    return repairs


@task(name="verify", cache_policy=NO_CACHE)
def verify_outputs(workspace: str, timeout_s: float) -> list[str]:
    """Every run, on every machine, starts here (``verify_and_repair``)."""
    return verify_and_repair(Path(workspace), timeout_s, get_run_logger())


@contextlib.contextmanager
def workspace_lock(workspace: Path, timeout_s: float, name: str = "flow.lock") -> Iterator[None]:
    """One flow run per workspace: a second waits up to ``timeout_s``, then is refused.

    An OS file lock, so a crashed run releases it with its process; DVC's own lock
    only guards one ``dvc`` command, and two runs interleaving stages would mix outputs.
    ``name``: the orchestrating run holds ``flow.lock``, a pool worker's stages
    ``stages.lock``, so an orchestrator may share a folder with a worker.
    """
    path = workspace / ".dvc" / "tmp" / name
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
