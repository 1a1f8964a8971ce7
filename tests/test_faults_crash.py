"""Crash anywhere (#7 item 1), checkpoints (item 5b), NaN loss and exploding gradients (item 6).

Every crash here is a real SIGKILL of a real process: the finetune stage stopped right
after its n-th checkpoint, a process killed at random moments while it saves
checkpoints, and ``dvc repro`` killed (its whole process group) while a stage runs or
while DVC commits the stage's outputs to its cache. What is checked afterwards is what a
later run would trust: the checkpoint file, DVC's lock file and cache.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml

from pipeline import runner as cli
from pipeline.errors import PipelineError
from pipeline.modeling import resume
from pipeline.modeling.model import load_checkpoint, save_checkpoint
from pipeline.stages import features, finetune, train_head
from pipeline.system.fsutil import load_torch_weights, md5_file
from pipeline.system.verify import cache_folder, verify
from tests.support.faults import FULL, record, trials
from tests.support.images import create_image_folder
from tests.support.project import (
    SMALL_BACKBONE,
    STAGES,
    changed,
    copy_project,
    git,
    set_params,
    tool_env,
)
from tests.support.world import TinyWorld

pytestmark = pytest.mark.faults

# 3 classes x 6 images: 12 for training, 4 a batch, 3 batches an epoch, only the last
# backbone block trained (fast on CPU). A checkpoint after every batch but an epoch's last,
# and one at each epoch's end: save n is in epoch (n - 1) // 3 + 1; n % 3 == 0 ends an epoch.
IMAGES_PER_CLASS = 6
RESUMABLE = {
    "epochs": 2,
    "batch_size": 4,
    "patience": 10,
    "unfreeze_blocks": 1,
    "checkpoint_every_steps": 1,
}
STEPS, SAVES_PER_EPOCH = 3, 3


@pytest.fixture
def small_run(tmp_path, monkeypatch):
    """The data stages run on 3 classes x 6 images, as ``tiny_run`` does with 10."""
    return TinyWorld.build(tmp_path, monkeypatch, images_per_class=IMAGES_PER_CLASS)


# The killed processes are forked from a server that has imported the pipeline once
# (multiprocessing's forkserver), so each costs a fork, not a fresh interpreter importing
# torch: the code that runs and is killed is the stage's own.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload([__name__])
SAVE_BYTES = 8 * (1 << 20) * 4  # what save_forever writes each time: 32 MiB of tensors


def _own_group_logging_to(log: str) -> None:
    """In a forked child: a process group of its own (its loader workers join it, and
    ``killpg`` kills them all), stdout and stderr into ``log``, and the start method a
    stage run from the command line has (a forkserver child inherits forkserver)."""
    os.setsid()
    multiprocessing.set_start_method("fork", force=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def finetune_until_checkpoint(n: int, cwd: str, log: str, conn) -> None:
    """Child: run the finetune stage; right after its n-th checkpoint is on disk, say so
    and stop (SIGSTOP) until the test SIGKILLs it."""
    _own_group_logging_to(log)
    os.chdir(cwd)
    write, saves = resume.save_training_checkpoint, []

    def save_then_stop(path, payload):
        write(path, payload)
        saves.append(path)
        if len(saves) == n:
            conn.send(n)
            os.kill(os.getpid(), signal.SIGSTOP)

    resume.save_training_checkpoint = save_then_stop
    conn.send(f"finetune ended with {cli.main(['finetune'])} after {len(saves)} checkpoints")


def save_forever(path: str, log: str, conn) -> None:
    """Child: save checkpoints (the stage's own save function) in a loop, printing each
    number once it is saved."""
    _own_group_logging_to(log)
    conn.send("ready")
    for n in itertools.count(1):
        weights = {f"layer{i}.weight": torch.full((1 << 20,), float(n)) for i in range(8)}
        resume.save_training_checkpoint(
            Path(path), {"fingerprint": "crash-test", "n": n, "model": weights}
        )
        sys.stdout.write(f"{n}\n")
        sys.stdout.flush()


def start_child(target, *args) -> tuple[multiprocessing.Process, str]:
    """Fork ``target(*args, conn)``; return the process and the first thing it says."""
    receive, send = FORKS.Pipe(duplex=False)
    proc = FORKS.Process(target=target, args=(*args, send))
    proc.start()
    send.close()
    try:
        said = receive.recv()
    except EOFError:
        proc.join()
        said = f"the child died (exit code {proc.exitcode})"
    receive.close()
    return proc, said


def kill_group(proc: multiprocessing.Process) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the process and its loader worker: no cleanup
    proc.join()


def kill_after_save(n: int, log: Path) -> str:
    """Run the finetune stage in a new process, SIGKILL it right after its n-th
    checkpoint; return what it logged."""
    proc, said = start_child(finetune_until_checkpoint, n, os.getcwd(), str(log))
    kill_group(proc)
    assert said == n, f"{said}:\n{log.read_text()}"
    return log.read_text()


def finetune_outputs(p) -> dict:
    """What a finished finetune stage leaves, minus timings: history, metrics, weights."""
    metrics = json.loads(p.paths.metrics_file("finetune").read_text())
    for timing in ("seconds", "train_images_per_second"):
        metrics.pop(timing)
    return {
        "history": pd.read_csv(p.paths.finetune_curves),
        "metrics": metrics,
        "weights": load_torch_weights(p.paths.model)["state_dict"],
    }


def clear_finetune_outputs(p) -> None:
    for path in (p.paths.model, p.paths.metrics_file("finetune"), p.paths.finetune_curves):
        path.unlink()


def same_run(a: dict, b: dict) -> bool:
    weights_equal = a["weights"].keys() == b["weights"].keys() and all(
        torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]
    )
    return a["history"].equals(b["history"]) and a["metrics"] == b["metrics"] and weights_equal


def resume_message(saves: int) -> str:
    """What finetune logs when it resumes from its ``saves``-th checkpoint."""
    epoch, step = (saves - 1) // SAVES_PER_EPOCH + 1, (saves - 1) % SAVES_PER_EPOCH + 1
    if saves % SAVES_PER_EPOCH == 0:
        return f"resuming finetune from the checkpoint after epoch {epoch}"
    return f"resuming finetune from the checkpoint at epoch {epoch}, step {step} of {STEPS}"


def test_resumed_finetune_matches_an_uninterrupted_run(small_run, tmp_path, caplog):
    """Chains of runs, each SIGKILLed right after a checkpoint (an epoch's end or a batch
    inside an epoch) and resumed by the next: the history, metrics and final weights are
    identical to those of a run that was never killed."""
    caplog.set_level(logging.INFO, logger="pipeline")
    p = small_run(finetune=RESUMABLE)
    features.main(p)
    train_head.main(p)
    small_run.write_params_file(finetune=RESUMABLE)
    finetune.main(p)
    reference = finetune_outputs(p)
    checkpoint = p.paths.checkpoints / "finetune.pt"
    assert len(reference["history"]) == 3  # epoch 0 (the head alone) and 2 trained epochs
    clear_finetune_outputs(p)

    # Each chain: how many checkpoints each process writes before it is killed. The
    # chains together kill after every checkpoint of both epochs, some several times.
    chains = [[3, 1]] if not FULL else [[1, 1, 1, 1, 1, 1], [2, 2, 2], [3, 3], [4, 1]]
    results = {"boundary": [], "mid-epoch": []}
    for c, chain in enumerate(chains):
        killed_at, logs = [], []
        for k, stops in enumerate(chain):
            killed_at.append((killed_at[-1] if killed_at else 0) + stops)
            logs.append(kill_after_save(stops, tmp_path / f"chain{c}-kill{k}.log"))
            assert not p.paths.model.exists()
        caplog.clear()
        finetune.main(p)
        logs = [*logs[1:], caplog.text]  # what the run after each kill logged
        # a finished run leaves no checkpoint for a later run to resume from
        same = same_run(finetune_outputs(p), reference) and not checkpoint.exists()
        for saves, log in zip(killed_at, logs, strict=True):
            kind = "boundary" if saves % SAVES_PER_EPOCH == 0 else "mid-epoch"
            results[kind].append((saves, same and resume_message(saves) in log))
        clear_finetune_outputs(p)

    for kind, label in (
        ("boundary", "right after an epoch checkpoint"),
        ("mid-epoch", "mid-epoch, right after a step checkpoint"),
    ):
        outcomes = [ok for _, ok in results[kind]]
        record(
            f"finetune: SIGKILL {label}, then rerun: same history, metrics and weights",
            len(outcomes),
            sum(outcomes),
            data_lost=outcomes.count(False),
            killed_after_checkpoint=[saves for saves, _ in results[kind]],
        )
    assert results["boundary"] and results["mid-epoch"]
    assert all(ok for kind in results.values() for _, ok in kind), results


def test_kill_during_checkpoint_save_never_leaves_a_torn_checkpoint(tmp_path):
    """SIGKILL at random moments while checkpoints are saved in a loop: the latest
    checkpoint always loads (weights only) and is whole, or is absent if none finished."""
    path = tmp_path / "checkpoints" / "finetune.pt"
    count = trials(20, 3)
    passed, inside_save, problems = 0, 0, []
    for trial in range(count):
        log = tmp_path / f"saver-{trial}.log"
        proc, said = start_child(save_forever, str(path), str(log))
        assert said == "ready", said
        time.sleep(random.Random(trial).uniform(0, 1.0))  # the kill moment, not a wait
        kill_group(proc)
        printed = [int(line) for line in log.read_text().split()]
        done = printed[-1] if printed else 0  # saves known to have finished

        temporaries = list(path.parent.glob(".finetune.pt.tmp-*"))
        inside_save += any(t.stat().st_size < SAVE_BYTES for t in temporaries)
        ok = True
        if path.exists():
            saved = load_torch_weights(path)
            whole = all(
                torch.equal(t, torch.full_like(t, saved["n"])) for t in saved["model"].values()
            )
            ok = saved["n"] >= done and whole and len(saved["model"]) == 8
        else:
            ok = done == 0
        # The resume reader deletes what killed saves left, and never reads it.
        again = resume.read_training_checkpoint(path, "crash-test")
        ok = ok and (again is None) == (not path.exists())
        ok = ok and not list(path.parent.glob(".finetune.pt.tmp-*"))
        passed += ok
        if not ok:
            problems.append((trial, done, path.exists()))
    record(
        "finetune checkpoint: SIGKILL at a random moment during a save (atomic write)",
        count,
        passed,
        data_lost=count - passed,
        killed_inside_torch_save=inside_save,
    )
    assert passed == count, problems
    if FULL:
        assert inside_save > 0  # some kills landed inside torch.save itself


def stage_outputs(p, stage: str) -> list[Path]:
    """The files a stage writes when it succeeds (its model, metrics and curve)."""
    model = {"train_head": p.paths.head, "finetune": p.paths.model}[stage]
    return [
        model,
        p.paths.metrics_file(stage),
        (p.paths.head_curves if stage == "train_head" else p.paths.finetune_curves),
    ]


def test_nan_loss_or_exploding_gradient_in_train_head_writes_nothing(small_run):
    """A cached feature of inf makes the loss NaN; one of 1e36 keeps the loss finite but
    overflows the gradient norm. Either stops the stage, naming epoch and step, before
    anything is written; with the features fixed the stage succeeds."""
    p = small_run()
    features.main(p)
    cached = p.paths.features / "train.npy"
    good = np.load(cached)
    faults = {
        "NaN/inf loss": (np.inf, r"loss became (nan|inf) in train_head epoch 1 step 1;"),
        "exploding gradient (finite loss, norm overflows)": (
            1e36,
            r"gradient norm became inf in train_head epoch 1 step 1 \(exploding gradients\)",
        ),
    }
    for fault, (value, message) in faults.items():
        bad = good.copy()
        bad[0, 0] = value
        np.save(cached, bad)
        with pytest.raises(PipelineError) as caught:
            train_head.main(p)
        written = [path for path in stage_outputs(p, "train_head") if path.exists()]
        named = re.search(message, str(caught.value)) is not None
        record(f"train_head: {fault}", 1, int(named and not written), data_lost=len(written))
        assert named, caught.value
        assert written == []
    np.save(cached, good)
    train_head.main(p)
    assert all(path.exists() for path in stage_outputs(p, "train_head"))


def test_nan_loss_or_exploding_gradient_in_finetune_keeps_the_last_good_checkpoint(
    small_run, monkeypatch, caplog
):
    """A head of inf weights (NaN loss), or one whose forward pass is fine but whose
    gradient overflows, stops finetune at epoch 1 step 1 with nothing written; the
    checkpoint an interrupted good run left is kept, and once the head is fixed the stage
    resumes from it."""
    caplog.set_level(logging.INFO, logger="pipeline")
    p = small_run(finetune={**RESUMABLE, "epochs": 1})
    features.main(p)
    train_head.main(p)
    checkpoint = p.paths.checkpoints / "finetune.pt"
    save = resume.save_training_checkpoint

    def save_then_interrupt(path, payload):
        save(path, payload)
        raise KeyboardInterrupt  # a good run stopped right after its first checkpoint

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(resume, "save_training_checkpoint", save_then_interrupt)
        finetune.main(p)
    good_checkpoint, good_head = checkpoint.read_bytes(), p.paths.head.read_bytes()

    card, data = load_checkpoint(p.paths.head)
    infinite = {k: torch.full_like(v, math.inf) for k, v in data["state_dict"].items()}
    # Hidden unit 0 outputs 1e-30 whatever the image; its outgoing weights are +-1e30, so
    # its share of the logits is about 1, but the gradient through it is about 1e30.
    exploding = {k: v.clone() for k, v in data["state_dict"].items()}
    exploding["0.weight"][0], exploding["0.bias"][0] = 0.0, 1e-30
    exploding["3.weight"][:, 0] = torch.tensor([1e30, -1e30, 0.0])
    faults = {
        "NaN/inf loss": (infinite, "loss became nan in finetune epoch 1 step 1;"),
        "exploding gradient (finite loss, norm overflows)": (
            exploding,
            "gradient norm became inf in finetune epoch 1 step 1 (exploding gradients)",
        ),
    }
    for fault, (head_state, message) in faults.items():
        save_checkpoint(p.paths.head, card, head_state)
        with pytest.raises(PipelineError) as caught:
            finetune.main(p)
        written = [path for path in stage_outputs(p, "finetune") if path.exists()]
        kept = checkpoint.read_bytes() == good_checkpoint
        loads = all(
            torch.isfinite(v).all() for v in load_torch_weights(checkpoint)["model"].values()
        )
        ok = message in str(caught.value) and not written and kept and loads
        record(
            f"finetune: {fault}; the last checkpoint is kept",
            1,
            int(ok),
            data_lost=len(written) + (not kept),
        )
        assert message in str(caught.value)
        assert written == [] and kept and loads

    p.paths.head.write_bytes(good_head)  # the input fixed: the stage resumes where it was
    caplog.clear()
    finetune.main(p)
    assert resume_message(1) in caplog.text
    assert all(path.exists() for path in stage_outputs(p, "finetune")) and not checkpoint.exists()


# --- Crash anywhere: kill -9 of `dvc repro` at random moments in every stage ---------


def cache_problems(repo: Path) -> list[str]:
    """What a later run would trust wrongly: outputs that differ from dvc.lock or whose
    cache objects do (``python -m pipeline verify``'s check), and any object in the cache,
    used or not, whose bytes do not hash to its name (a partial copy DVC left)."""
    cache = cache_folder(repo)
    try:
        report = verify(repo, cache)
    except yaml.YAMLError as exc:
        return [f"dvc.lock is not YAML: {exc}"]
    problems = [problem.reason for problem in report.problems] + report.skipped
    for obj in cache.rglob("*"):
        if DVC_TEMPORARY.fullmatch(obj.name):
            continue  # DVC copies into "<dir>/.<token>.tmp", then renames: never read as an object
        name = obj.parent.name + obj.name
        if obj.is_file() and md5_file(obj) != name.removesuffix(".dir"):
            problems.append(f"cache object {name} does not hash to its name")
    return problems


# dvc_objects.fs.utils.tmp_fname: what a DVC killed mid-copy leaves in its cache.
DVC_TEMPORARY = re.compile(r"\.[A-Za-z0-9_-]{22}\.tmp")


def torn_state_files(repo: Path, dvc_output: str) -> list[str]:
    """DVC's own files that a kill left torn, by their content or by DVC's complaint about
    them. DVC rewrites ``.dvc/tmp/rwlock`` and dvc.lock in place (open for writing, then
    dump), so a kill between truncating and writing leaves them empty or cut short
    (treeverse/dvc#7615); a dvc.lock cut short can still be YAML, so DVC's word counts."""
    torn = []
    for name, parse, complaint in (
        (".dvc/tmp/rwlock", json.loads, "RWLock-file"),
        ("dvc.lock", yaml.safe_load, "dvc.lock"),
    ):
        try:
            parse((repo / name).read_text())
        except FileNotFoundError:
            continue
        except (ValueError, yaml.YAMLError):
            torn.append(name)
            continue
        if complaint in dvc_output:
            torn.append(name)
    return torn


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_repro(repo: Path, stage: str, phase: str, rng: random.Random, seconds: float) -> dict:
    """Start ``dvc repro --force --single-item <stage>`` and SIGKILL its process group.

    ``phase`` "command": at a random moment while the stage's command runs (up to its
    usual duration); "commit": at a random moment within 0.3 s after the command exited,
    while DVC hashes the outputs, copies them to its cache and writes dvc.lock.
    Returns where the kill landed, as seen from outside.
    """
    log = repo.parent / f"killed-{stage}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", "--force", "--single-item", stage],
            cwd=repo,
            env=tool_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    while not descendants(proc.pid):  # the stage's command has started
        assert proc.poll() is None, f"dvc repro {stage} ended early:\n{log.read_text()}"
        time.sleep(0.01)
    if phase == "command":
        deadline = time.monotonic() + rng.uniform(0, seconds)
        while time.monotonic() < deadline and descendants(proc.pid):
            time.sleep(0.01)
    else:
        while descendants(proc.pid):
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
    command_running = bool(descendants(proc.pid))
    dvc_running = proc.poll() is None  # poll() reaps an exited dvc: its group is gone
    if dvc_running:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    stale = rwlock.exists() and f'"pid": {proc.pid}' in rwlock.read_text()
    landed = "command" if command_running else "commit" if dvc_running else "after dvc exited"
    return {
        "stage": stage,
        "phase": phase,
        "landed": landed,
        "stale_rwlock": stale,  # names the killed dvc: the rerun must see it is dead
    }


def run_dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", *args], cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=1200
    )


@pytest.fixture
def dvc_workspace(tmp_path: Path) -> Path:
    images = create_image_folder(tmp_path / "images", {"cat": 8, "dog": 8, "bird": 8})
    repo = copy_project(tmp_path / "repo")
    git(repo, "init", "-q")
    set_params(
        repo,
        data={"source": str(images)},
        model=SMALL_BACKBONE,
        head={"epochs": 3},
        finetune={"epochs": 2, "batch_size": 4, "checkpoint_every_steps": 1},
        export={"calibration_images": 8},
        onnx_check={"max_int8_drop": 1.0, "latency_runs": 5, "throughput_batches": 1},
    )
    return repo


def test_kill_dvc_repro_anywhere_then_a_plain_rerun_recovers(dvc_workspace):
    """SIGKILL ``dvc repro`` (and the stage under it) while a stage runs or while DVC
    commits its outputs; then a plain ``dvc repro`` completes, ``dvc status`` is clean,
    every output and cache object hashes to what DVC recorded, and no lock needs cleaning."""
    repo = dvc_workspace
    # `make faults`: every stage, killed once while its command runs and once after it.
    # CI: download and validate, the cheapest (the fingerprint before them runs each time).
    stages = STAGES if FULL else ("download", "validate")
    targets = [] if FULL else [stages[-1]]
    first = run_dvc(repo, "repro", *targets)
    assert first.returncode == 0, first.stdout + first.stderr
    seconds = {
        s: json.loads((repo / "logs" / "stages" / f"{s}.json").read_text())["seconds"] + 2.0
        for s in stages
    }
    count = trials(20, 4)
    plan = [
        (stages[i % len(stages)], ("command", "commit")[(i // len(stages)) % 2])
        for i in range(count)
    ]
    outcomes = []
    for trial, (stage, phase) in enumerate(plan):
        good_lock = (repo / "dvc.lock").read_bytes()
        rng = random.Random(trial)
        for _attempt in range(3):  # a kill that came after dvc had exited is not a trial
            killed = kill_repro(repo, stage, phase, rng, seconds[stage])
            if killed["landed"] != "after dvc exited":
                break
        # The project's run sequence (`make run`, the flow): verify --repair, then repro.
        repaired = subprocess.run(
            [sys.executable, "-m", "pipeline", "verify", "--repair"],
            cwd=repo,
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        killed["repairs"] = [
            line for line in repaired.stdout.splitlines() if line.startswith("verify: repaired: ")
        ]
        rerun = run_dvc(repo, "repro", *targets)
        killed["rerun_ok"] = repaired.returncode == 0 and rerun.returncode == 0
        killed["rerun_log"] = (rerun.stdout + rerun.stderr)[-2000:]
        killed["torn"] = torn_state_files(repo, "" if killed["rerun_ok"] else rerun.stderr)
        if not killed["rerun_ok"] and killed["torn"]:
            # The manual cleanup a person would do (delete the lock, `git checkout
            # dvc.lock`), so that the next trials start from a sound workspace.
            if ".dvc/tmp/rwlock" in killed["torn"]:
                (repo / ".dvc" / "tmp" / "rwlock").unlink()
            if "dvc.lock" in killed["torn"]:
                (repo / "dvc.lock").write_bytes(good_lock)
            cleaned = run_dvc(repo, "repro", *targets)
            assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
        status = run_dvc(repo, "status", "--json", *targets)
        killed["clean"] = (
            status.returncode == 0 and changed(json.loads(status.stdout or "{}")) == {}
        )
        killed["problems"] = cache_problems(repo)
        outcomes.append(killed)
    passed = [o for o in outcomes if o["rerun_ok"] and o["clean"] and not o["problems"]]
    landed = {}
    for o in outcomes:
        landed[o["landed"]] = landed.get(o["landed"], 0) + 1
    record(
        "crash anywhere: SIGKILL of `dvc repro` during a stage or DVC's commit, then verify --repair and rerun",
        len(outcomes),
        len(passed),
        data_lost=sum(bool(o["problems"]) for o in outcomes),
        landed=landed,
        stages=sorted({o["stage"] for o in outcomes}),
        stale_rwlock_entries_cleared=sum(o["stale_rwlock"] for o in outcomes),
        rwlock_left_torn=sum(".dvc/tmp/rwlock" in o["torn"] for o in outcomes),
        dvc_lock_left_torn=sum("dvc.lock" in o["torn"] for o in outcomes),
        torn_state_repaired_by_verify=sum(bool(o["repairs"]) for o in outcomes),
    )
    failed = [o for o in outcomes if o not in passed]
    assert not failed, "\n".join(
        f"{o['stage']} killed in {o['landed']}: rerun ok {o['rerun_ok']}, status clean "
        f"{o['clean']}, problems {o['problems']}, repairs {o['repairs']}, torn {o['torn']}\n"
        f"{o['rerun_log']}"
        for o in failed
    )
    assert landed.get("command", 0) and landed.get("commit", 0), landed
