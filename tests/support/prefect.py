"""A real Prefect server on 127.0.0.1 and the project's flow run against it, on tiny data."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.project import (
    REPO_ROOT,
    SMALL_BACKBONE,
    copy_project,
    git,
    set_params,
    tool_env,
)

# Tiny-data settings for a whole flow run: a tiny random backbone, few epochs, quick timings.
FLOW_TINY = {
    "model": SMALL_BACKBONE,
    "head": {"epochs": 5},
    "finetune": {"epochs": 1, "batch_size": 8},
    # the torch engine: no ONNX export of the backbone for the features of 36 images
    "features": {"engine": "torch"},
    # int8 calibration costs about a second per batch of images: one small batch here
    "export": {"calibration_images": 4},
    # random weights on noise images: int8 may flip a near-chance prediction or two
    "onnx_check": {"max_int8_drop": 1.0, "latency_runs": 5, "throughput_batches": 1},
    "flows": {"download_retries": 0},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(tmp: Path) -> dict[str, str]:
    return {
        **tool_env(),  # this interpreter's tools first on PATH, analytics off
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONPATH": str(REPO_ROOT),
    }


def make_repo(root: Path, images: Path, **sections) -> Path:
    """A git + DVC repository of this project on tiny data, committed."""
    copy_project(root, extra=("flows", "prefect.yaml"))
    merged = {k: dict(v) for k, v in FLOW_TINY.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    set_params(root, data={"source": str(images)}, **merged)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    return root


def copy_workspace(src: Path, dst: Path) -> Path:
    """A copy of a run workspace (git, DVC cache, outputs): a test that needs a finished run
    starts from one instead of running every stage again. DVC keys its state by path, so the
    copy's outputs are hashed once, not trusted."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run(args: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def flows_run(repo: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "flows", "run", *extra], repo, env)


def start_flow_run(repo: Path, env: dict, *extra: str) -> subprocess.Popen:
    """``python -m flows run`` in the background, in its own session, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows", "run", *extra],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stage_statuses(output: str) -> dict[str, str]:
    """Each task's own report, ``<stage>: ran in 1.2 s`` or ``<stage>: up to date in ...``."""
    return dict(re.findall(r"Task run '\w+-\w+' - (\w+): (ran|up to date) in", output))


@contextlib.contextmanager
def prefect_server(tmp: Path) -> Iterator[dict[str, str]]:
    """``prefect server start`` on a free loopback port; yields the environment to reach it."""
    port = free_port()
    env = base_env(tmp)
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(
                f"prefect server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(1)
    yield {**env, "PREFECT_API_URL": api}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@contextlib.contextmanager
def served(repo: Path, env: dict, log: Path, replace: bool = True) -> Iterator[subprocess.Popen]:
    """``python -m flows serve`` in ``repo`` until the block ends, once it serves its
    deployments (applied to the server: a same-named one of an earlier test is replaced);
    its output goes to ``log``. ``replace``: pass ``--replace``, since the tests on one
    server also ``prefect deploy`` the same names for work pools."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows", "serve", *(["--replace"] if replace else [])],
        cwd=repo,
        # the runner looks for scheduled runs every 10 s by default: every 2 s here, so a
        # test's `prefect deployment run` starts sooner; unbuffered, so the log is live
        env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PYTHONUNBUFFERED": "1"},
        stdout=open(log, "w"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "being served" not in log.read_text(errors="replace"):  # Prefect's start message
            assert serve.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield serve
    finally:
        serve.terminate()
        serve.wait(timeout=60)


def run_deployment(repo: Path, env: dict) -> subprocess.CompletedProcess:
    """``prefect deployment run training-pipeline/scheduled --watch``, as a user starts it."""
    return run(
        ["prefect", "deployment", "run", "training-pipeline/scheduled", "--watch"], repo, env
    )


def latest_artifact(repo: Path, env: dict, key: str) -> str:
    """The data of the newest artifact ``key`` on the server."""
    shown = run(
        ["prefect", "artifact", "inspect", key, "--limit", "1", "-o", "json"], repo, env, 120
    )
    (latest,) = json.loads(shown.stdout)
    return latest["data"]


def processes_in(folder: Path) -> list[str]:
    """Command lines of the processes whose working directory is ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == folder:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found
