"""A flow run's process killed outright (#7 item 7): its stage dies with it, Prefect marks
the run Crashed (not Running forever), and the next run finishes the job.

Real processes, a real ``prefect server`` on 127.0.0.1 and the automation that
``python -m flows crash-detection`` creates; no part of Prefect or DVC is stood in for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.cluster import run_name
from tests.support.faults import FULL, record
from tests.support.prefect import (
    flows_run,
    make_repo,
    processes_in,
    run,
    stage_statuses,
    start_flow_run,
)
from tests.support.project import REPO_ROOT, changed

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to watch processes")
def test_a_child_started_through_pipeline_process_dies_with_its_parent():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys\n"
            "child = subprocess.Popen([sys.executable, '-m', 'pipeline.system.process', '--', 'sleep', '300'])\n"
            "print(child.pid, flush=True)\n"
            "child.wait()\n",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while not Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep\0"):
        assert time.monotonic() < deadline, "the child never exec'd sleep"
        time.sleep(0.05)
    parent.kill()  # SIGKILL: the parent can do nothing for its child
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.stdout.close()
    assert not alive(child), "the child outlived its SIGKILLed parent"


def flow_runs(env: dict, cwd: Path, names: list[str]) -> list[dict]:
    """The server's flow runs of these names (the session's server also holds the runs
    of other tests: the distributed ones, for one)."""
    code = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName\n"
        "with get_client(sync_client=True) as client:\n"
        "    runs = client.read_flow_runs(\n"
        f"        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_={names!r}))\n"
        "    )\n"
        "print(json.dumps([{'name': r.name, 'state': r.state.type.value, "
        "'message': r.state.message} for r in runs]))\n"
    )
    done = run([sys.executable, "-c", code], cwd, env, 120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def read_lines(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@pytest.mark.skipif(not FULL, reason="waits ~3 min for Prefect's heartbeat automation: make faults")
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the stage's process")
def test_a_killed_flow_run_ends_crashed_and_the_next_run_finishes(server, images, tmp_path):  # noqa: F811
    repo = make_repo(tmp_path / "repo", images, finetune={"epochs": 3}, flows={"heartbeat_s": 30})
    setup = run([sys.executable, "-m", "flows", "crash-detection"], repo, server, 300)
    assert setup.returncode == 0, setup.stdout + setup.stderr

    flow = start_flow_run(repo, server)
    output: list[str] = []  # read as it comes: a full pipe would stall the run
    threading.Thread(target=read_lines, args=(flow.stdout, output), daemon=True).start()
    deadline = time.monotonic() + 600
    while not any("pipeline finetune" in cmd for cmd in processes_in(repo)):
        assert flow.poll() is None and time.monotonic() < deadline, "finetune never started"
        time.sleep(0.2)
    os.kill(flow.pid, signal.SIGKILL)  # the worker dies: no handler, no cleanup
    flow.wait()
    name = run_name("".join(output))  # this test's run: the server holds other tests' too
    killed_at = time.monotonic()
    while processes_in(repo) and time.monotonic() < killed_at + 20:
        time.sleep(0.2)
    orphans = processes_in(repo)

    # Prefect's automation: no heartbeat for 3 x 30 s → Crashed.
    deadline = killed_at + 300
    while True:
        runs = flow_runs(server, repo, [name])
        states = [r["state"] for r in runs]
        if states == ["CRASHED"] or time.monotonic() > deadline:
            break
        time.sleep(5)
    crashed_after_s = round(time.monotonic() - killed_at)

    again = flows_run(repo, server)
    statuses = stage_statuses(again.stdout + again.stderr)
    status = run([sys.executable, "-m", "dvc", "status", "--json"], repo, server)
    finished = (
        again.returncode == 0
        and statuses.get("finetune") == "ran"
        and statuses.get("train_head") == "up to date"
        and changed(json.loads(status.stdout)) == {}
    )
    ok = orphans == [] and states == ["CRASHED"] and finished
    record(
        "flow: the flow run's process killed (SIGKILL) mid-finetune",
        1,
        int(ok),
        0 if finished else 1,
        crashed_after_s=crashed_after_s,
    )
    assert orphans == [], "a stage outlived its killed flow run"
    assert states == ["CRASHED"], runs
    assert "no heartbeat for 90 s" in runs[0]["message"]
    assert finished, again.stdout + again.stderr


# The orchestrator loses the server's answer to "create this pool's flow run". -------------
LOST_ANSWER = """
import json, threading, time, uuid
import httpx
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.states import Completed

from flows.databus import RunState
from flows.dvcrun import DvcStage
from flows.pools import run_group_on_pool
from flows.stages import FLOW_NAME

placement = f"lost-answer-{uuid.uuid4().hex[:8]}"
with get_client(sync_client=True) as client:
    flow_id = client.create_flow_from_name(FLOW_NAME)
    deployment = client.create_deployment(flow_id=flow_id, name=placement)

lost = []
send = httpx.Client.send  # Prefect's sync client, which resends a request whose answer it lost


def losing_the_first_answer(self, request, **kwargs):  # the request reaches the server
    answer = send(self, request, **kwargs)
    if request.url.path.endswith("/create_flow_run") and not lost:
        lost.append(str(request.url))
        raise httpx.ReadTimeout("the answer was lost", request=request)
    return answer


httpx.Client.send = losing_the_first_answer

def runs_of_the_deployment(client):
    only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment]))
    return client.read_flow_runs(deployment_filter=only)

def pool_worker(stop):  # finishes each flow run of the deployment, as a worker would
    with get_client(sync_client=True) as client:
        while not stop.is_set():
            for run in runs_of_the_deployment(client):
                if not run.state.is_final():
                    client.set_flow_run_state(run.id, Completed(), force=True)
            time.sleep(0.5)

@flow
def orchestrate():
    run_group_on_pool([DvcStage("train", placement, ())], "a-pool", "file:///repo", "0" * 40, RunState("", None))

stop = threading.Event()
threading.Thread(target=pool_worker, args=(stop,), daemon=True).start()
orchestrate()
stop.set()
with get_client(sync_client=True) as client:
    print(json.dumps({"lost": lost, "runs": [r.name for r in runs_of_the_deployment(client)]}))
"""


def test_a_lost_answer_to_create_a_pools_flow_run_makes_one_run_not_two(server):  # noqa: F811
    """Prefect's client resends a POST whose answer it lost (a read timeout, or a 503 while
    the server's SQLite is locked): the pool's stages must still run once. Seen in CI: a
    second flow run on the GPU pool found the first one's stages up to date."""
    done = run([sys.executable, "-c", LOST_ANSWER], REPO_ROOT, server, 180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    record("pool flow run created, answer lost", 1, int(len(found["runs"]) == 1))
    assert len(found["lost"]) == 1, found
    assert found["runs"] == ["train"], found
