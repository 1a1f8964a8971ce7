"""A distributed setup on one machine, over loopback: the origin repository (the user's,
where runs are orchestrated), moto's S3 server as the DVC remote, and a Prefect process
worker per pool, each in its own clone. For tests/test_distributed.py and
bench/distributed.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.prefect import run
from tests.support.project import git, share_structures
from tests.support.s3 import S3Server, s3_server

POOLS = {"gpu": "gpu-pool", "cpu": "cpu-pool"}
DVC = [sys.executable, "-m", "dvc"]
PREFECT = [sys.executable, "-m", "prefect"]


@dataclass
class Cluster:
    """The origin repository (the user's, where runs are orchestrated), the S3 remote, and
    a worker per pool, each in its own clone."""

    tmp: Path
    env: dict[str, str]
    s3: S3Server
    origin: Path
    clones: dict[str, Path] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_worker(self, pool: str) -> None:
        clone = self.clones[pool]
        self.workers[pool] = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", pool, "--name", f"{pool}-worker"],
            cwd=clone,
            env={**self.env, "TRANSFER_PIPELINE_DIR": str(clone)},
            stdout=open(self.tmp / f"{pool}-worker.log", "a"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_worker(self, pool: str) -> None:
        """The worker's machine lost: the worker, its flow run, DVC and the stage all die at
        once (every process working in the worker's clone, SIGKILL)."""
        proc = self.workers.pop(pool)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids_in(self.clones[pool]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        """Ctrl-C to each idle worker, as a user stops one; SIGKILL after 5 s (a worker
        given SIGTERM sat out a 30 s wait every time)."""
        for proc in self.workers.values():
            os.killpg(proc.pid, signal.SIGINT)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def api(self, path: str, body: dict) -> list[dict]:
        request = urllib.request.Request(
            self.env["PREFECT_API_URL"] + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def orchestrate(self, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run(
            [sys.executable, "-m", "flows", "run", "--distributed", *extra],
            cwd or self.origin,
            self.env,
            1200,
        )

    def stage_runs(self, parent_name: str) -> list[dict]:
        """The pipeline-stages flow runs a training-pipeline run started, with their
        records (the run-state artifact each left) and task runs."""
        (parent,) = self.api("/flow_runs/filter", {"flow_runs": {"name": {"any_": [parent_name]}}})
        tasks = self.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [parent["id"]]}}})
        children = self.api(
            "/flow_runs/filter",
            {"flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in tasks]}}},
        )
        found = []
        for child in children:
            artifacts = self.api(
                "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [child["id"]]}}}
            )
            states = [
                json.loads(a["data"]) if isinstance(a["data"], str) else a["data"]
                for a in artifacts
                if a["type"] == "run-state"
            ]
            child["records"] = states[0]["records"] if states else []
            child["task_runs"] = self.api(
                "/task_runs/filter", {"flow_runs": {"id": {"any_": [child["id"]]}}}
            )
            found.append(child)
        return sorted(found, key=lambda c: c["expected_start_time"])


def pids_in(folder: Path) -> list[int]:
    """The processes whose working directory is ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == folder:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def run_name(output: str) -> str:
    names = re.findall(r"Beginning flow run '([\w-]+)' for flow 'training-pipeline'", output)
    assert names, output[-3000:]
    return names[0]


def check(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


@contextlib.contextmanager
def distributed_setup(tmp: Path, server_env: dict[str, str], origin: Path) -> Iterator[Cluster]:
    """``origin`` (a committed repository of this project) given an S3 remote, the pools and
    deployments created as a user creates them, and a worker per pool in its own clone."""
    with s3_server(tmp) as s3:
        env = {
            **server_env,
            **s3.env(),
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick runs up within a second (default 10)
        }
        url = f"s3://{s3.bucket}/store"
        for args in (
            ["remote", "add", "-d", "bus", url],
            ["remote", "modify", "bus", "endpointurl", s3.endpoint],
        ):
            check(run([*DVC, *args], origin, env))
        git(origin, "add", ".dvc/config")
        git(origin, "commit", "-qm", "the data bus: an S3 remote")
        for pool in POOLS.values():
            created = run(
                [*PREFECT, "work-pool", "create", pool, "--type", "process"], origin, env, 120
            )
            assert created.returncode == 0 or "already exists" in created.stdout, created.stdout
        check(run([*PREFECT, "--no-prompt", "deploy", "--all"], origin, env, 300))
        check(run([sys.executable, "-m", "flows", "crash-detection"], origin, env, 300))
        found = Cluster(tmp, env, s3, origin)
        for placement, pool in POOLS.items():
            found.clones[pool] = tmp / f"{placement}-machine"
            git(tmp, "clone", "-q", str(origin), str(found.clones[pool]))
            # each machine's cache as after its first export (the first run's outputs still
            # travel only through the S3 remote)
            share_structures(found.clones[pool])
            found.start_worker(pool)
        try:
            yield found
        finally:
            found.stop()
