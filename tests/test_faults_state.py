"""Concurrency and state (#7 item 7): damaged bytes in DVC's outputs or cache are caught by
``python -m pipeline verify`` before they are trusted, and two ``dvc repro`` started
together on one workspace never mix their outputs.

All of it runs real DVC on a real workspace (download → validate → split on tiny images:
the cheapest stages with file and folder outputs, cached and uncached).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.system.fsutil import md5_file
from pipeline.system.verify import cache_folder, lock_entries, lock_file_problem
from tests.support.faults import record, trials
from tests.support.images import create_image_folder
from tests.support.project import (
    REPO_ROOT,
    changed,
    copy_project,
    dvc,
    git,
    set_params,
    tool_env,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.one_worker]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC workspace where download, validate and split have run (shared: each
    test leaves it as it found it, and checks that)."""
    tmp_path = tmp_path_factory.mktemp("state")
    repo = copy_project(tmp_path / "repo")
    git(repo, "init", "-q")
    images = create_image_folder(tmp_path / "images", {"cat": 8, "dog": 8, "bird": 8})
    set_params(repo, data={"source": str(images)})
    dvc(repo, "repro", "split")
    return repo


def verify(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "verify", "--root", str(repo), *args],
        cwd=REPO_ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def flip_byte(path: Path, rng: random.Random) -> int:
    """Damage one byte in place, keeping the inode, size and mtime: bit rot as DVC sees it."""
    before = path.stat()
    offset = rng.randrange(before.st_size)
    os.chmod(path, 0o644)  # DVC may make cache objects read-only
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, before.st_mode & 0o777)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return offset


def files_against_lock(repo: Path, cache: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(md5 per file as dvc.lock records it, md5 per file as read from disk)."""
    entries, _ = lock_entries(repo, cache)
    files = [e for e in entries if not e.is_manifest]
    recorded = {str(e.path): e.md5 for e in files}
    actual = {str(e.path): md5_file(e.path) for e in files if e.path.is_file()}
    return recorded, actual


def damage_targets(repo: Path, cache: Path) -> list[tuple[str, object]]:
    """Every file behind dvc.lock, and every cache object it uses: where a byte can rot."""
    entries, skipped = lock_entries(repo, cache)
    assert skipped == []
    targets = [("workspace", e) for e in entries if not e.is_manifest]
    # dvc.lock does not say which outputs are uncached (metrics, the source fingerprint):
    # those have no cache object to damage
    stored = [e for e in entries if e.cached and (cache / e.md5[:2] / e.md5[2:]).is_file()]
    return targets + [("cache", e) for e in stored]


def kind_of(target) -> str:
    where, entry = target
    return "manifest" if entry.is_manifest else where


def dvc_status_clean(repo: Path) -> bool:
    """``dvc status`` of the stages this workspace ran (the later ones never ran here)."""
    return changed(json.loads(dvc(repo, "status", "--json", "split"))) == {}


def test_verify_finds_every_damaged_byte_and_repair_plus_repro_restores_the_run(reproduced):
    repo = reproduced
    cache = cache_folder(repo)
    targets = damage_targets(repo, cache)
    kinds = {kind_of(t) for t in targets}
    assert kinds == {"workspace", "cache", "manifest"}

    rng = random.Random(7)
    count = trials(20, 3)
    # The first trials damage one of each kind; the rest pick at random.
    firsts = [next(t for t in targets if kind_of(t) == kind) for kind in sorted(kinds)]
    passed = lost = unnoticed_by_dvc = 0
    failures: list[str] = []
    for trial in range(count):
        # From the current dvc.lock: a stage that reran left other outputs (its old cache
        # objects are no longer used, and not checked: `dvc gc` territory).
        targets = damage_targets(repo, cache)
        where, entry = firsts[trial] if trial < len(firsts) else rng.choice(targets)
        damaged = entry.path if where == "workspace" else cache / entry.md5[:2] / entry.md5[2:]
        offset = flip_byte(damaged, rng)
        unnoticed_by_dvc += dvc_status_clean(repo)
        found = verify(repo)
        repaired = verify(repo, "--repair")
        dvc(repo, "repro", "split")
        after = verify(repo)
        # Every file matches what dvc.lock records now (a stage that reran, e.g. after an
        # output with no intact copy was removed, records its new outputs).
        expected, now = files_against_lock(repo, cache)
        ok = (
            found.returncode == 1
            and str(damaged) in found.stderr
            and "DAMAGED" in found.stderr
            and repaired.returncode == 0
            and after.returncode == 0
            and "0 damaged" in after.stdout
            and dvc_status_clean(repo)
            and now == expected
        )
        if not ok:
            failures.append(
                f"trial {trial}: {where} {damaged} @ {offset}: found {found.returncode}, "
                f"repaired {repaired.returncode}, after {after.returncode} {after.stdout}, "
                f"status clean {dvc_status_clean(repo)}, contents equal {now == expected}"
                f"\n{found.stderr}\n{repaired.stdout}"
            )
        passed += ok
        lost += now != expected
    record(
        "state: a byte of an output or cache object damaged (mtime kept)",
        count,
        passed,
        lost,
        unnoticed_by_plain_dvc_status=unnoticed_by_dvc,
    )
    assert passed == count, "\n".join(failures)


def test_two_repros_at_once_take_turns_or_one_is_refused(reproduced):
    """Both forced to redo split at the same moment: DVC's locks (the repository lock, and
    per-output read/write locks that name the holding PID, with entries of dead PIDs
    dropped) let one run; the other waits or fails saying who holds the lock. The outputs
    are one run's, whole."""
    repo = reproduced
    count = trials(50, 3)
    passed = lost = refused = 0
    failures_seen: list[str] = []
    for trial in range(count):
        cmd = ["dvc", "repro", "--force", "--single-item", "split"]
        procs = [
            subprocess.Popen(
                cmd,
                cwd=repo,
                env=tool_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [(p.wait(timeout=600), p.stdout.read()) for p in procs]
        for p in procs:
            p.stdout.close()
        failures = [out for code, out in outputs if code != 0]
        refused += len(failures)
        clean = dvc_status_clean(repo) and verify(repo).returncode == 0
        ok = (
            clean
            and len(failures) <= 1
            and all(
                "Unable to acquire lock" in out
                or ("is busy, it is being blocked by" in out and "(PID " in out)
                for out in failures
            )
        )
        if not ok:
            failures_seen.append(f"trial {trial}: {outputs}")
        passed += ok
        lost += not clean
    record(
        "concurrency: two `dvc repro` on one workspace at once",
        count,
        passed,
        lost,
        second_refused=refused,
    )
    assert passed == count, "\n".join(failures_seen)


def test_dvc_state_files_cut_short_by_a_kill_are_repaired(reproduced):
    """DVC rewrites dvc.lock and .dvc/tmp/rwlock in place (treeverse/dvc#7615): a kill
    mid-write leaves them cut short and every later dvc command fails. ``verify`` names
    them; ``verify --repair`` resets the rwlock and restores dvc.lock from git (or removes
    it when git has none); then ``dvc repro`` completes and everything matches again."""
    repo = reproduced
    lock_bytes = (repo / "dvc.lock").read_bytes()
    rng = random.Random(11)
    count = trials(10, 2)
    passed = lost = invalid_locks = 0
    failures: list[str] = []
    for trial in range(count):
        committed = trial % 2 == 0  # dvc.lock in git's last commit, or never committed
        if committed:
            git(repo, "add", "dvc.lock")
            git(repo, "commit", "-qm", f"lock {trial}", "--allow-empty")
        else:
            git(repo, "rm", "-q", "--cached", "--ignore-unmatch", "dvc.lock")
            git(repo, "commit", "-qm", f"no lock {trial}", "--allow-empty")
        cut = rng.randrange(1, len(lock_bytes) - 1)
        (repo / "dvc.lock").write_bytes(lock_bytes[:cut])
        # DVC's own verdict on the cut dvc.lock, before the rwlock is torn too (a torn
        # rwlock alone fails `dvc status`): a cut at a line boundary can leave a valid,
        # shorter lock file (DVC then just reruns what it lacks), most cuts do not.
        lock_invalid = run_dvc_anyhow(repo).returncode != 0
        rwlock = repo / ".dvc" / "tmp" / "rwlock"
        # Trial 0 cuts it to nothing (DVC truncated it, then died): empty is torn too.
        rwlock.write_text(
            '{"write": {"data/raw": {"pid": 1, "cmd": "dvc rep'[
                : 0 if trial == 0 else rng.randrange(1, 40)
            ]
        )
        found = verify(repo)
        repaired = verify(repo, "--repair")
        dvc(repo, "repro", "split")
        after = verify(repo)
        lock_repair = (
            "restored the torn dvc.lock from git" if committed else "removed the torn dvc.lock"
        )
        ok = (
            found.returncode == 1
            and "TORN (a killed dvc left it unreadable): .dvc/tmp/rwlock" in found.stderr
            and ("TORN (a killed dvc left it unreadable): dvc.lock" in found.stderr) == lock_invalid
            and repaired.returncode == 0
            and (lock_repair in repaired.stdout) == lock_invalid
            and "reset the torn .dvc/tmp/rwlock" in repaired.stdout
            and after.returncode == 0
            and dvc_status_clean(repo)
        )
        invalid_locks += lock_invalid
        if not ok:
            failures.append(f"trial {trial} (cut at {cut}):\n{found.stderr}\n{repaired.stdout}")
        passed += ok
        lost += after.returncode != 0
    record(
        "state: dvc.lock and DVC's rwlock cut short by a kill mid-write",
        count,
        passed,
        lost,
        dvc_lock_invalid=invalid_locks,
    )
    assert passed == count, "\n".join(failures)


# A small DVC project whose dvc.lock has every kind of entry ours has: file and folder
# deps, params, cached file and folder outs, an uncached metrics file, two stages.
SMALL_DVC_YAML = """\
stages:
  make:
    cmd: cp in.txt out.txt && mkdir -p outdir && cp -r inputs/. outdir/ && echo {} > metrics.json
    deps: [in.txt, inputs]
    params: [make.count, make.name]
    outs: [out.txt, outdir]
    metrics:
    - metrics.json:
        cache: false
  total:
    cmd: cat out.txt outdir/a.txt > total.txt
    deps: [out.txt, outdir]
    outs: [total.txt]
"""


def digits_first_text() -> str:
    """Text whose md5 starts with four decimal digits: cut after them, ``md5: 4715`` is the
    number 4715 to a YAML reader (the case #42 found verify calling sound)."""
    return next(
        text
        for i in range(100_000)
        if hashlib.md5((text := f"input {i}\n").encode()).hexdigest()[:4].isdigit()
    )


def test_dvc_lock_cut_at_every_byte_is_called_torn_or_is_one_dvc_can_use(tmp_path):
    """Every cut point of a real dvc.lock, not a sample: ``verify`` calls it torn (and
    --repair replaces it), or DVC itself loads it and works out every stage's status from
    it (what ``dvc repro`` does before it runs anything). DVC's verdict is taken in this
    process, so the sweep takes seconds."""
    from dvc.repo import Repo

    repo = tmp_path / "small"
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(SMALL_DVC_YAML)
    (repo / "params.yaml").write_text("make:\n  count: 3\n  name: small\n")
    (repo / "in.txt").write_text(digits_first_text())
    (repo / "inputs").mkdir()
    (repo / "inputs" / "a.txt").write_text("a\n")
    (repo / "inputs" / "b.txt").write_text("b\n")
    dvc(repo, "repro")
    lock = repo / "dvc.lock"
    whole = lock.read_bytes()
    assert any(
        line.split(": ")[-1][:4].isdigit()
        for line in whole.decode().splitlines()
        if "md5: " in line
    )

    torn, unusable = 0, []
    for cut in range(len(whole)):  # 0: DVC truncated the file, then died
        lock.write_bytes(whole[:cut])
        if lock_file_problem(lock) is not None:
            torn += 1
            continue
        try:
            with Repo(str(repo)) as dvc_repo:
                dvc_repo.status()
        except Exception as exc:  # whatever DVC raises on a lock it cannot use
            tail = whole[max(0, cut - 40) : cut].decode(errors="replace")
            unusable.append(f"cut at {cut} (...{tail!r}): {type(exc).__name__}: {exc}")
    lock.write_bytes(whole)
    record(
        "state: dvc.lock cut at every byte of a small real lock: called torn, or DVC can use it",
        len(whole),
        len(whole) - len(unusable),
        called_torn=torn,
    )
    assert unusable == [], "verify calls these sound, DVC cannot use them:\n" + "\n".join(
        unusable[:20]
    )
    assert 0 < torn < len(whole)


def run_dvc_anyhow(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["dvc", "status"], cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=300
    )
