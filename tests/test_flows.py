"""The Prefect flow against a real Prefect server on 127.0.0.1, on tiny data through DVC."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.dvcrun import WorkspaceBusy, retry_options, stage_error, stage_order, workspace_lock
from flows.training import params_overridden, reproduce
from pipeline.config import load_params
from pipeline.errors import ConfigError
from tests.support.prefect import (
    copy_workspace,
    flows_run,
    latest_artifact,
    make_repo,
    processes_in,
    run,
    run_deployment,
    served,
    stage_statuses,
    start_flow_run,
)
from tests.support.project import (
    REPO_ROOT,
    SETTLED,
    STAGES,
    dvc_yaml,
    git,
    set_params,
    stages_run,
    up_to_date,
)

# make test: one worker runs the whole module, so its module-scoped fixture is built once
pytestmark = [pytest.mark.slow, pytest.mark.one_worker]


def test_stage_order_comes_from_dvc():
    assert stage_order(REPO_ROOT) == list(STAGES)


def test_every_task_has_prefects_caching_off():
    """DVC is the one cache (STYLE.md, rule 6): no Prefect task of the flows may skip its
    work on a cached result, with its options changed per stage or not."""
    import importlib
    import pkgutil

    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    import flows

    tasks = [
        obj
        for info in pkgutil.iter_modules(flows.__path__)
        for obj in vars(importlib.import_module(f"flows.{info.name}")).values()
        if isinstance(obj, Task)
    ]
    names = {t.name for t in tasks}
    assert {"reproduce", "stage_here", "verify", "dvc-push", "dvc-pull", "dvc-exp-save"} <= names
    assert sorted(t.name for t in tasks if t.cache_policy is not NO_CACHE) == []
    cfg = load_params(REPO_ROOT / "params.yaml").flows
    staged = reproduce.with_options(name="download", **retry_options("download", cfg))
    assert staged.cache_policy is NO_CACHE


def test_only_download_retries_with_doubling_delays():
    cfg = load_params(REPO_ROOT / "params.yaml").flows
    delays = [cfg.retry_delay_s * 2**i for i in range(cfg.download_retries)]
    assert cfg.download_retries > 1 and delays[1] == 2 * delays[0]
    assert retry_options("download", cfg) == {
        "retries": cfg.download_retries,
        "retry_delay_seconds": delays,
    }
    assert retry_options("features", cfg) == {"retries": 0, "retry_delay_seconds": None}


def test_stage_error_keeps_the_stages_own_message():
    output = "Running stage 'split':\n12:00:01 ERROR pipeline: split failed: data/x.csv is empty\nERROR: failed to reproduce 'split'\n"
    assert stage_error(output) == (
        "ERROR pipeline: split failed: data/x.csv is empty\nERROR: failed to reproduce 'split'"
    )


def test_overrides_are_checked_applied_and_restored(tmp_path):
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    original = (tmp_path / "params.yaml").read_text()
    with params_overridden(tmp_path, {"head.lr": 0.0005, "finetune.epochs": 2}):
        during = yaml.safe_load((tmp_path / "params.yaml").read_text())
        assert (during["head"]["lr"], during["finetune"]["epochs"]) == (0.0005, 2)
        assert "# The one place for settings" in (tmp_path / "params.yaml").read_text()
    assert (tmp_path / "params.yaml").read_text() == original
    with pytest.raises(ConfigError, match=r"unknown key 'head.lrr' \(did you mean 'head.lr'\?\)"):
        with params_overridden(tmp_path, {"head.lrr": 0.1}):
            pass
    with pytest.raises(RuntimeError):
        with params_overridden(tmp_path, {"head.lr": 0.1}):
            raise RuntimeError("a stage failed")
    assert (tmp_path / "params.yaml").read_text() == original


def test_a_bad_set_fails_in_one_line_naming_the_key_before_prefect_starts():
    """`python -m flows run --set` holds each key to what it accepts, as params.yaml."""
    done = subprocess.run(
        [sys.executable, "-m", "flows", "run", "--set", "head.lr=-5"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "python -m flows run: overrides head.lr: head.lr: expected float > 0 or 'auto', got -5"
    )


def test_a_second_run_waits_for_the_workspace_or_is_refused(tmp_path):
    (tmp_path / ".dvc").mkdir()
    with workspace_lock(tmp_path, timeout_s=0):
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy, match=r"in use by another flow run \(pid \d+ since"):
            with workspace_lock(tmp_path, timeout_s=1.5):
                pass
        assert time.monotonic() - started >= 1.5
    with workspace_lock(tmp_path, timeout_s=0):  # released: the next run gets it at once
        pass


@pytest.fixture(scope="module")
def ran(server, images, tmp_path_factory) -> Path:
    """A workspace the flow has run once, every stage through DVC (``python -m flows run``);
    the tests below that need a finished run start from a copy of it."""
    repo = make_repo(tmp_path_factory.mktemp("ran") / "repo", images)
    done = flows_run(repo, server)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    (repo.parent / "flow-run.log").write_text(output)
    return repo


def test_a_flow_run_reproduces_every_stage_through_dvc(ran, server):
    output = (ran.parent / "flow-run.log").read_text()
    assert stage_statuses(output) == dict.fromkeys(STAGES, "ran"), output[-3000:]
    assert re.search(r"Flow run '[\w-]+' - Finished in state Completed", output), output[-3000:]
    assert (ran / "models/model.onnx").is_file() and (ran / "reports/index.html").is_file()
    status = run([sys.executable, "-m", "dvc", "status"], ran, server)
    assert up_to_date(status.stdout), status.stdout


def test_served_deployment_runs_and_finds_a_finished_run_up_to_date(ran, server, tmp_path):
    repo = copy_workspace(ran, tmp_path / "repo")
    with served(repo, server, tmp_path / "serve.log"):
        inspected = run(
            ["prefect", "deployment", "inspect", "training-pipeline/scheduled"], repo, server, 120
        )
        assert "'cron': '0 2 * * *'" in inspected.stdout and "'timezone': 'UTC'" in inspected.stdout

        done = run_deployment(repo, server)
        assert done.returncode == 0 and "Completed" in done.stdout, done.stdout + done.stderr
        log = (tmp_path / "serve.log").read_text()
        assert stage_statuses(log) == SETTLED, log[-3000:]

        summary = latest_artifact(repo, server, "training-pipeline-summary")
        for stage in STAGES:
            placement = dvc_yaml()["stages"][stage]["meta"]["placement"]
            assert f"| {stage} | {placement} | {SETTLED[stage]} |" in summary, summary
        assert "| ONNX top-1 agreement | 1.0000 |" in summary
        assert re.search(r"\| ONNX max abs logit difference \| \d\.\de[-+]\d\d \|", summary)
        assert f"ONNX model: `{(repo / 'models/model.onnx').resolve()}`" in summary
        report = (repo / "reports/index.html").resolve()
        assert f"Run report: `{report}`" in summary
        # Prefect keeps a link artifact as the markdown "[text](url)"; the CLI's console
        # reads "[text]" as markup and drops it, so only "(url)" is left to compare.
        assert f"({report.as_uri()})" in latest_artifact(repo, server, "training-pipeline-report")


def test_a_failing_stage_fails_its_task_and_the_flow(server, tmp_path):
    missing = tmp_path / "no-such-folder"
    repo = make_repo(tmp_path / "repo", missing)
    done = flows_run(repo, server)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert re.search(
        r"Task run 'download-\w+' - Finished in state Failed\(\W.*no-such-folder", output
    ), output
    assert "stage download failed (exit " in output and "does not exist" in output
    assert re.search(r"Flow run '[\w-]+' - Finished in state Failed", output)
    assert "Task run 'validate" not in output  # nothing ran after the failed stage


def test_overrides_become_an_experiment_and_overlapping_runs_take_turns(ran, server, tmp_path):
    """Run a, with an override, becomes a DVC experiment and restores params.yaml; run b,
    started in the same workspace while a holds it, waits, then finds params.yaml's outputs
    (DVC's run cache) and leaves a workspace DVC finds consistent. The override is one of
    onnx_check's params, so only onnx_check and report rerun: any param takes this path."""
    repo = copy_workspace(ran, tmp_path / "repo")
    params_before = (repo / "params.yaml").read_text()
    a = start_flow_run(repo, server, "--set", "onnx_check.latency_runs=6")
    lock = repo / ".dvc/tmp/flow.lock"
    deadline = time.monotonic() + 300
    while not (lock.exists() and lock.read_text().startswith("pid")):
        assert a.poll() is None and time.monotonic() < deadline, a.stdout.read() if a.stdout else ""
        time.sleep(0.5)
    b = flows_run(repo, server)
    out_a, _ = a.communicate(timeout=900)
    assert a.returncode == 0 and b.returncode == 0, out_a + b.stdout + b.stderr
    ran_a, ran_b = stage_statuses(out_a), stage_statuses(b.stdout + b.stderr)
    # promote reads onnx_check's figures, and registers every candidate (its uncached
    # output keeps DVC's run cache from restoring it: docs/registry.md)
    assert ran_a == {
        **SETTLED,
        "onnx_check": "ran",
        "promote": "ran",
        "report": "ran",
    }, out_a[-3000:]
    # b started after a had finished: onnx_check restored from DVC's run cache, on the
    # figures before a's, so promote and the report run again
    assert ran_b == {**SETTLED, "promote": "ran", "report": "ran"}, b.stdout[-3000:]
    assert (repo / "params.yaml").read_text() == params_before  # restored after the run

    shown = json.loads(
        run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, server).stdout
    )
    experiments = [
        exp
        for commit in shown
        for exp in (commit.get("experiments") or [])
        for rev in exp.get("revs", [])
        if rev.get("data", {})
        .get("params", {})
        .get("params.yaml", {})
        .get("data", {})
        .get("onnx_check", {})
        .get("latency_runs")
        == 6
    ]
    assert experiments, json.dumps(shown)[:3000]
    status = run([sys.executable, "-m", "dvc", "status"], repo, server)
    assert up_to_date(status.stdout), status.stdout


def test_dvc_remote_round_trip(ran, server, tmp_path):
    repo = copy_workspace(ran, tmp_path / "repo")
    remote = tmp_path / "remote"
    dvc = [sys.executable, "-m", "dvc"]
    assert run([*dvc, "remote", "add", "-d", "shared", str(remote)], repo, server).returncode == 0
    done = flows_run(repo, server, "--push")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Task run 'dvc-push" in done.stdout + done.stderr and any(remote.rglob("*"))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "run")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    pulled = run([*dvc, "pull"], clone, server)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert (clone / "models/model.onnx").read_bytes() == (repo / "models/model.onnx").read_bytes()
    repro = run([*dvc, "repro"], clone, server)
    assert repro.returncode == 0 and not stages_run(repro.stdout), repro.stdout


def test_prefect_deploy_takes_the_schedule_from_params_yaml(server, images, tmp_path):
    """``prefect deploy`` from prefect.yaml, as a user runs it, against the real server: the
    deployment's schedule and heartbeat are params.yaml's (written once, issue #17)."""
    repo = make_repo(
        tmp_path / "repo", images, flows={"cron": "15 3 * * 1", "timezone": "Europe/Paris"}
    )
    pool = run(
        ["prefect", "work-pool", "create", "gpu-pool", "--type", "process"], repo, server, 120
    )
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stderr
    env = {**server, "TRANSFER_PIPELINE_DIR": str(repo)}
    deployed = run(["prefect", "--no-prompt", "deploy", "--name", "scheduled"], repo, env, 300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    shown = run(
        ["prefect", "deployment", "inspect", "training-pipeline/scheduled", "--output", "json"],
        repo,
        server,
        120,
    )
    assert shown.returncode == 0, shown.stderr
    deployment = json.loads(shown.stdout)
    (schedule,) = deployment["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == (
        "15 3 * * 1",
        "Europe/Paris",
    )
    env_vars = deployment["job_variables"]["env"]
    heartbeat = yaml.safe_load((repo / "params.yaml").read_text())["flows"]["heartbeat_s"]
    assert env_vars["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(heartbeat)

    # then served from the same project: refused unasked (deleting the pool's deployment
    # drops its scheduled runs); with --replace, the served one takes its place, without
    # the pull steps that fetch the pool's code storage (served runs crashed on them)
    assert deployment["pull_steps"], deployment
    refused = run([sys.executable, "-m", "flows", "serve"], repo, server, 120)
    assert refused.returncode != 0
    assert "training-pipeline/scheduled (work pool 'gpu-pool') exists" in refused.stderr
    assert "--replace" in refused.stderr
    with served(repo, server, tmp_path / "serve.log", replace=True):
        shown = run(
            ["prefect", "deployment", "inspect", "training-pipeline/scheduled", "--output", "json"],
            repo,
            server,
            120,
        )
    deployment = json.loads(shown.stdout)
    assert deployment["work_pool_name"] is None and not deployment["pull_steps"], deployment
    assert "replacing training-pipeline/scheduled" in (tmp_path / "serve.log").read_text()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the stage's process")
def test_a_cancelled_run_kills_its_stage_and_the_next_run_finishes(ran, server, tmp_path):
    repo = copy_workspace(ran, tmp_path / "repo")
    set_params(repo, onnx_check={"latency_runs": 6})  # onnx_check and report rerun
    flow = start_flow_run(repo, server)
    deadline = time.monotonic() + 600
    while not any("pipeline onnx_check" in cmd for cmd in processes_in(repo)):
        assert flow.poll() is None and time.monotonic() < deadline, "onnx_check never started"
        time.sleep(0.2)
    flow.send_signal(signal.SIGTERM)  # what Prefect's runner sends to cancel a flow run
    output, _ = flow.communicate(timeout=120)
    assert "Finished in state Crashed" in output or "Cancelled" in output, output[-2000:]
    time.sleep(1)
    assert processes_in(repo) == [], "the stage outlived its cancelled flow run"

    again = flows_run(repo, server)
    assert again.returncode == 0, again.stdout + again.stderr
    statuses = stage_statuses(again.stdout + again.stderr)
    assert statuses["export"] == "up to date" and statuses["onnx_check"] == "ran"
    assert (repo / "models/model.onnx").is_file()
    status = run([sys.executable, "-m", "dvc", "status"], repo, server)
    assert up_to_date(status.stdout), status.stdout
