"""``python -m pipeline verify [--repair]``: re-hash DVC's outputs and cache before trusting them.

DVC decides what is up to date from its state database (inode, mtime and size → md5),
so bytes that change without a new mtime (bit rot, a faulty disk or copy, a restored
backup) are never noticed, and neither is a damaged object in the cache: a later
``dvc repro``, ``dvc checkout`` or ``dvc push`` would trust them. This reads the bytes:
every output recorded in dvc.lock against its md5 there, and every cache object those
outputs use against its own name (a cache object's name is its md5).

It also reads DVC's own state files, which DVC rewrites in place rather than atomically
(treeverse/dvc#7615): ``dvc repro`` killed while writing them leaves ``dvc.lock`` or
``.dvc/tmp/rwlock`` cut short, and every later ``dvc`` command fails on them.

``--repair`` fixes what it can without guessing: a damaged workspace file is restored from
an intact cache object, a damaged cache object from an intact workspace file, and where
both are damaged both are removed, so the next ``dvc repro`` reruns the stage. A torn
rwlock is reset (under DVC's own guard lock); a torn dvc.lock is restored from git's last
commit, or removed when git has none, so DVC reruns what no longer matches it. The
Prefect flow and ``make run`` run it before every ``dvc repro``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.system.fsutil import atomic_path, md5_file, remove, write_text_atomic


@dataclass(frozen=True)
class Entry:
    """One file DVC vouches for: where it is, what its md5 must be, and its cache object."""

    stage: str
    path: Path  # in the workspace
    md5: str  # as dvc.lock writes it: "<md5>" for a file, "<md5>.dir" for a folder's manifest
    cached: bool

    @property
    def is_manifest(self) -> bool:
        """A folder output's manifest: a cache object only, listing the folder's files."""
        return self.md5.endswith(".dir")


@dataclass(frozen=True)
class Problem:
    entry: Entry
    workspace_ok: bool  # the workspace file exists and matches (or is absent: nothing to trust)
    cache_ok: bool  # the cache object matches (or is absent)
    reason: str


@dataclass(frozen=True)
class Report:
    files: int
    bytes_read: int
    problems: list[Problem]
    skipped: list[str]
    torn: list[str]  # DVC state files a killed dvc left unreadable (see torn_state_files)


def cache_object(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def cache_folder(root: Path) -> Path:
    """DVC's local cache for md5 objects, wherever .dvc/config (or DVC_CACHE_DIR) puts it."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return Path(repo.cache.local.path)


REPAIRED = "repaired: "  # marks each line that says what --repair changed (the flow lists them)
RWLOCK = Path(".dvc/tmp/rwlock")
LOCKFILE = Path("dvc.lock")


def torn_state_files(root: Path) -> list[str]:
    """DVC's state files that DVC could not use: the rwlock as JSON, dvc.lock as DVC reads
    it (see lock_file_problem)."""
    torn = []
    rwlock, lockfile = root / RWLOCK, root / LOCKFILE
    if rwlock.exists():
        try:  # DVC reads it with json.load: an empty file (a kill between DVC's truncate
            # and its write) stops every later dvc command too
            json.loads(rwlock.read_text(encoding="utf-8"))
        except ValueError as exc:
            torn.append(f"{RWLOCK}: not JSON ({exc})")
    if lockfile.exists():
        problem = lock_file_problem(lockfile)
        if problem is not None:
            torn.append(f"{LOCKFILE}: not a valid lock file ({problem})")
    return torn


def lock_file_problem(path: Path) -> str | None:
    """Why DVC could not use this dvc.lock, or None.

    DVC reads it with its own YAML parser (YAML 1.2: ``md5: 9e8`` is a float) and checks it
    against its schema, then uses the values as parsed, not as the schema coerced them
    (dvc/utils/strictyaml.py: "not returning validated data"). So a hash cut short to
    digits, ``md5: 4715``, passes the schema as the number 4715 and every later dvc command
    fails on it ("'int' object has no attribute 'endswith'"). Both are checked here: DVC's
    own reading, then the type of every hash it will dereference."""
    from dvc.exceptions import DvcException
    from dvc.schema import COMPILED_LOCKFILE_SCHEMA
    from dvc.utils import strictyaml

    try:
        data, _ = strictyaml.load(str(path), COMPILED_LOCKFILE_SCHEMA)
    except DvcException as exc:  # YAMLSyntaxError, YAMLValidationError, EncodingError
        detail = str(exc.__cause__ or exc).strip()
        return detail.splitlines()[0] if detail else type(exc).__name__
    from dvc_data.hashfile.hash import algorithms_available

    for where, value in lock_hashes(data):
        if where.endswith(".hash"):  # the algorithm DVC hashes the file with again
            if value not in algorithms_available:
                return f"{where} is {value!r}, not a hash algorithm DVC knows"
        elif not isinstance(value, str | None):
            return f"{where} is the {type(value).__name__} {value!r}, not a hash"
    return None


def lock_hashes(data: dict) -> Iterator[tuple[str, object]]:
    """(where, value) of every hash field in a lock's deps and outs, their directory
    listings (``files``) and cloud versions, and of each entry's hash algorithm
    (``hash: md5``): the fields DVC makes HashInfo objects of."""
    from dvc.output import CHECKSUMS_SCHEMA

    def walk(where: str, entry: object) -> Iterator[tuple[str, object]]:
        if not isinstance(entry, dict):
            return
        for field in (*CHECKSUMS_SCHEMA, "hash"):  # md5, etag, checksum; the algorithm
            if field in entry:
                yield f"{where}.{field}", entry[field]
        for i, item in enumerate(entry.get("files") or []):
            yield from walk(f"{where}.files[{i}]", item)
        for remote, item in (entry.get("cloud") or {}).items():
            yield from walk(f"{where}.cloud.{remote}", item)

    for stage, record in (data.get("stages") or {}).items():
        for kind in ("deps", "outs"):
            for i, entry in enumerate(record.get(kind) or []):
                yield from walk(f"stages.{stage}.{kind}[{i}]", entry)


def repair_state_files(root: Path) -> list[str]:
    """Reset a torn rwlock; put back git's dvc.lock (or none) for a torn one."""
    done = []
    for torn in torn_state_files(root):
        if torn.startswith(str(RWLOCK)):
            with open(root / ".dvc" / "tmp" / "rwlock.lock", "a+") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)  # the lock DVC takes to edit the rwlock
                write_text_atomic(root / RWLOCK, "{}")
            done.append(f"reset the torn {RWLOCK} (its holders are gone: it could not be read)")
        else:
            committed = subprocess.run(
                ["git", "show", f"HEAD:{LOCKFILE}"], cwd=root, capture_output=True
            )
            if committed.returncode == 0:
                write_text_atomic(root / LOCKFILE, committed.stdout.decode("utf-8"))
                done.append(
                    f"restored the torn {LOCKFILE} from git (HEAD); `dvc repro` reruns what differs"
                )
            else:
                remove(root / LOCKFILE)
                done.append(f"removed the torn {LOCKFILE} (not in git); `dvc repro` rebuilds it")
    return done


def lock_entries(root: Path, cache: Path) -> tuple[list[Entry], list[str]]:
    """Every file behind dvc.lock's outputs; directory outputs are expanded through their
    ``.dir`` manifest, which is itself a cache object and is checked as one."""
    lock_file = root / "dvc.lock"
    if not lock_file.exists():
        return [], ["no dvc.lock: nothing has been reproduced yet"]
    from dvc.utils import strictyaml  # DVC's YAML reading, as lock_file_problem judged it

    stages = (strictyaml.load(str(lock_file))[0] or {}).get("stages", {})
    entries: list[Entry] = []
    skipped: list[str] = []
    for stage, record in stages.items():
        for out in record.get("outs", []):
            md5, path = out.get("md5"), root / out["path"]
            if not md5:
                continue
            entries.append(Entry(stage, path, md5, out.get("cache", True)))
            if not entries[-1].is_manifest:
                continue
            manifest = cache_object(cache, md5)
            if not manifest.is_file() or md5_file(manifest) != md5.removesuffix(".dir"):
                skipped.append(f"the files of {out['path']}: its manifest is missing or damaged")
            else:
                entries += [
                    Entry(stage, path / item["relpath"], item["md5"], True)
                    for item in json.loads(manifest.read_bytes())
                ]
    return entries, skipped


def check(entry: Entry, cache: Path) -> tuple[Problem | None, int]:
    """Hash the workspace file and its cache object; a problem if either is damaged."""
    copies = [] if entry.is_manifest else [("workspace", entry.path)]
    if entry.cached:
        copies.append(("cache", cache_object(cache, entry.md5)))
    expected = entry.md5.removesuffix(".dir")
    bytes_read, damaged = 0, {}
    for where, path in copies:
        if not path.is_file():
            if entry.is_manifest:  # without it the folder's files cannot be checked
                damaged[where] = f"the manifest {path} of {entry.path} is missing"
            continue  # an absent output DVC sees itself (the stage reruns or is checked out)
        actual = md5_file(path)
        bytes_read += path.stat().st_size
        if actual != expected:
            damaged[where] = f"{where} copy {path} has md5 {actual}, dvc.lock says {expected}"
    if not damaged:
        return None, bytes_read
    problem = Problem(
        entry, "workspace" not in damaged, "cache" not in damaged, "; ".join(damaged.values())
    )
    return problem, bytes_read


def verify(root: Path, cache: Path | None = None) -> Report:
    torn = torn_state_files(root)
    if any(t.startswith(str(LOCKFILE)) for t in torn):
        return Report(0, 0, [], ["outputs: dvc.lock cannot be read"], torn)
    cache = cache_folder(root) if cache is None else cache
    entries, skipped = lock_entries(root, cache)
    problems, total = [], 0
    for entry in entries:
        problem, read = check(entry, cache)
        total += read
        if problem is not None:
            problems.append(problem)
    return Report(len(entries), total, problems, skipped, torn)


def repair(problem: Problem, cache: Path, root: Path) -> str:
    """Restore the damaged copy from the intact one, or remove both (the stage reruns)."""
    entry = problem.entry
    cached = cache_object(cache, entry.md5)
    if entry.is_manifest:
        # Only DVC writes manifests: drop the damaged one and let DVC save the folder again.
        remove(cached)
        dvc_commit(root, entry.stage)
        return f"rewrote the manifest of {entry.path} (dvc commit --force {entry.stage})"
    if not problem.workspace_ok and problem.cache_ok and cached.is_file():
        copy_atomic(cached, entry.path)
        return f"restored {entry.path} from the cache"
    if problem.workspace_ok and not problem.cache_ok and entry.path.is_file():
        copy_atomic(entry.path, cached)
        return f"restored the cache object {cached} from {entry.path}"
    remove(entry.path)
    remove(cached)
    return f"removed {entry.path} and its cache object; `dvc repro` reruns stage {entry.stage}"


def dvc_commit(root: Path, stage: str) -> None:
    """``dvc commit --force <stage>``: DVC saves the stage's outputs to the cache again."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "--force", stage],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise PipelineError(f"dvc commit --force {stage} failed: {done.stderr.strip()}")


def copy_atomic(source: Path, target: Path) -> None:
    """Copy to a temp path beside ``target`` and rename it into place, keeping the replaced
    file's permissions (DVC keeps cache objects read-only). The new inode makes DVC rehash."""
    mode = target.stat().st_mode & 0o777 if target.exists() else None
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
        if mode is not None:
            os.chmod(tmp, mode)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline verify",
        description="Re-hash every DVC output and cache object against dvc.lock.",
    )
    parser.add_argument("--root", default=".", help="the DVC workspace (default: .)")
    parser.add_argument(
        "--repair", action="store_true", help="restore or remove damaged copies (see module doc)"
    )
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    lines, errors = [], []
    if args.repair:
        # First: DVC cannot even open the repository otherwise.
        lines += [f"{REPAIRED}{done}" for done in repair_state_files(root)]
    cache = cache_folder(root)
    report = verify(root, cache)
    lines += [f"not checked: {note}" for note in report.skipped]
    errors += describe(report)
    if args.repair:
        lines += [f"{REPAIRED}{repair(problem, cache, root)}" for problem in report.problems]
    lines.append(
        f"{report.files} files, {report.bytes_read / 1e6:.1f} MB read, {len(report.problems)} "
        f"damaged{', repaired' if args.repair and report.problems else ''}"
    )
    sys.stderr.writelines(f"verify: {line}\n" for line in errors)
    sys.stdout.writelines(f"verify: {line}\n" for line in lines)
    return 1 if (report.problems or report.torn) and not args.repair else 0


def describe(report: Report) -> Iterator[str]:
    for torn in report.torn:
        yield f"TORN (a killed dvc left it unreadable): {torn}"
    for problem in report.problems:
        yield f"DAMAGED (stage {problem.entry.stage}): {problem.reason}"
    if report.torn or report.problems:
        yield (
            "run `python -m pipeline verify --repair`, then `dvc repro`: intact copies "
            "are restored, outputs with no intact copy are recomputed"
        )
