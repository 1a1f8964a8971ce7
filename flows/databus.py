"""What travels between machines in a distributed run, and how.

Two channels: the **run's state**, the small files git would carry (params.yaml with the
run's overrides, dvc.lock, the uncached outputs DVC leaves to git, the stages' run logs),
travels with the Prefect runs; the **data** (every cached output and DVC's run cache)
travels through the repository's default DVC remote. Code travels as a git commit: each
worker works in its own clone and refuses one whose code differs from the run's.
"""

from __future__ import annotations

import logging
import os
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flows.dvcrun import StageFailed, run_dvc
from pipeline.config import FlowsParams, Paths, parse_section
from pipeline.errors import ConfigError
from pipeline.system.fsutil import write_text_atomic

log = logging.getLogger(__name__)

# Files dvc repro rewrites beside the outputs it adds; state, not code.
DVC_MANAGED = (".gitignore",)


@dataclass
class RunState:
    """The run's state outside the DVC cache: ``files`` maps a workspace path to its text,
    or to None where the run has no such file yet."""

    params: str
    lock: str | None
    files: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def read(cls, workspace: Path, files: list[str]) -> RunState:
        return cls(
            params=(workspace / "params.yaml").read_text(encoding="utf-8"),
            lock=_read(workspace / "dvc.lock"),
            files={name: _read(workspace / name) for name in files},
        )

    def write(self, workspace: Path, with_params: bool = True) -> None:
        """Make ``workspace``'s state this run's: written atomically, absent files removed."""
        entries = {"dvc.lock": self.lock, **self.files}
        if with_params:
            entries["params.yaml"] = self.params
        for name, text in entries.items():
            path = workspace / name
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, text)

    def to_dict(self) -> dict:
        return {"params": self.params, "lock": self.lock, "files": self.files}

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        return cls(data["params"], data.get("lock"), dict(data.get("files") or {}))

    def paths(self) -> set[str]:
        return {"params.yaml", "dvc.lock", *self.files}

    def settings(self) -> tuple[FlowsParams, Paths]:
        """The run's ``flows`` and ``paths`` sections (params.yaml with its overrides), read
        and checked: where the run's flows, on every machine, take their settings from."""
        raw = yaml.safe_load(self.params)
        return parse_section(raw, "flows"), parse_section(raw, "paths")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def redacted(url: str) -> str:
    """``url`` without any user or password (tokens) in it, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if not (parts.username or parts.password):
        return url
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()


def git(workspace: Path, *args: str, check: bool = True) -> str:
    """``git <args>`` in ``workspace``; never prompts (a worker has no terminal)."""
    done = subprocess.run(
        ["git", *args],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )
    if check and done.returncode != 0:
        shown = " ".join(redacted(a) for a in args)
        raise ConfigError(f"git {shown} in {workspace}: {done.stderr.strip()}")
    return done.stdout


def changed_code(workspace: Path, state: set[str]) -> list[str]:
    """Tracked files that differ from HEAD, other than the run's state and DVC's .gitignores."""
    changed = []
    entries = git(workspace, "status", "--porcelain", "-z", "--untracked-files=no").split("\0")
    renamed = False
    for entry in entries:
        if renamed:  # the source path of a rename: already counted by its new name
            renamed = False
            continue
        if not entry:
            continue
        status, name = entry[:2], entry[3:]
        renamed = "R" in status or "C" in status
        if name not in state and not name.endswith(DVC_MANAGED):
            changed.append(name)
    return changed


def run_commit(workspace: Path, state: set[str]) -> tuple[str, str]:
    """The repository URL and commit a distributed run's workers check out; refused when
    the orchestrating workspace's code is not committed (workers could not get it)."""
    changed = changed_code(workspace, state)
    if changed:
        raise ConfigError(
            f"a distributed run runs committed code, and {workspace} has uncommitted changes "
            f"to {', '.join(changed[:5])}{' …' if len(changed) > 5 else ''}: commit them "
            "(and push, if workers clone from a remote) or stash them"
        )
    commit = git(workspace, "rev-parse", "HEAD").strip()
    url = git(workspace, "remote", "get-url", "origin", check=False).strip() or str(workspace)
    return url, commit


def check_out_run_commit(workspace: Path, url: str, commit: str, state: set[str]) -> None:
    """Move this worker's clone to the run's commit, or refuse: a clone with local code
    changes would run other code than the run's."""
    changed = changed_code(workspace, state)
    head = git(workspace, "rev-parse", "HEAD", check=False).strip()
    if changed:
        raise StageFailed(
            f"worker workspace {workspace} has local changes to {', '.join(changed[:5])}: "
            f"it would not run the run's code (commit {commit[:12]}); discard them or give "
            "the worker a clean clone"
        )
    if head == commit:
        return
    if not git(workspace, "cat-file", "-t", commit, check=False).strip():
        try:
            git(workspace, "fetch", "-q", url, commit)
        except ConfigError:  # a server that refuses fetching by hash: its branches, then
            try:
                git(workspace, "fetch", "-q", url, "+refs/heads/*:refs/remotes/transfer-pipeline/*")
            except ConfigError as exc:
                raise StageFailed(f"worker workspace {workspace}: {exc}") from exc
        if not git(workspace, "cat-file", "-t", commit, check=False).strip():
            raise StageFailed(f"commit {commit[:12]} is not in {redacted(url)}: push it first")
    git(workspace, "checkout", "-q", "--force", "--detach", commit)


@dataclass(frozen=True)
class Remote:
    name: str
    url: str

    def __str__(self) -> str:
        return f"DVC remote '{self.name}' ({self.url})"


def default_remote(repo) -> Remote:
    """The default DVC remote (``dvc remote default``): the data bus of a distributed run.
    Its URL is shown without any user or password in it."""
    name = repo.config["core"].get("remote")
    if not name:
        raise ConfigError(
            f"a distributed run carries data through the default DVC remote, and {repo.root_dir} "
            "has none: `dvc remote add -d <name> s3://bucket/path` (credentials from the "
            "environment or `dvc remote modify --local`)"
        )
    return Remote(name, redacted(str(repo.config["remote"].get(name, {}).get("url", "?"))))


def cache_objects(cache_dir: Path) -> dict[str, int]:
    """Every file under ``cache_dir`` (the local DVC cache's objects, ``repo.cache.local``,
    or its run cache) with its size: one scandir per folder."""
    found: dict[str, int] = {}
    for root, _, names in os.walk(cache_dir):
        for name in names:
            try:
                found[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                continue
    return found


def added_bytes(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(size for path, size in after.items() if path not in before)


def check_remote(repo) -> Remote:
    """The default remote, reached once: a remote that is down or refuses the credentials
    stops the run here, before any stage, with an error naming it."""
    remote = default_remote(repo)
    try:
        odb = repo.cloud.get_remote_odb(remote.name)
        odb.fs.exists(odb.path)
    except Exception as exc:
        hint = ""
        if any(
            word in str(exc)
            for word in (
                "Forbidden",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403",
            )
        ):
            hint = (
                " (the remote refused this machine's credentials: check its AWS_* environment "
                "variables or `dvc remote modify --local` settings)"
            )
        raise StageFailed(f"{remote} cannot be reached: {exc}{hint}") from exc
    return remote


def check_out_inputs(workspace: Path, stages: list[str]) -> tuple[Path, Path, dict[str, int]]:
    """Put the inputs these stages take from other stages (not from each other), their
    deps and what dvc.yaml's ``meta.reads`` names, into the workspace at the run's
    dvc.lock: checked out from the local cache, or pulled from the default remote where
    the cache lacks them. A worker's copy may be another run's, so every such input is
    compared with the lock; only those that differ are touched.

    So are the stages' own persisted outputs (the raw store, the segmented tables) as the
    lock has them: a stage extends its last output, so what it writes, and the push after
    it, is what changed, on whichever machine it runs. One that cannot be had is warned
    about, not fatal: the stage then writes its output whole.

    Returns the local DVC cache's object and run-cache folders, and the bytes fetched per
    stage."""
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    fetched = dict.fromkeys(stages, 0)
    with Repo(str(workspace)) as repo:
        remote = check_remote(repo)
        cache_dir = Path(repo.cache.local.path)
        runs_dir = Path(repo.stage_cache.cache_dir)
        by_name = {stage.addressing: stage for stage in repo.index.stages}
        producer = {
            out.fs_path: (stage.addressing, out)
            for stage in by_name.values()
            for out in stage.outs
            if out.use_cache
        }
        for name in stages:
            stage = by_name[name]
            inputs = {dep.fs_path: dep.def_path for dep in stage.deps}
            for path in (stage.meta or {}).get("reads", []):  # read, vouched for by a dep
                inputs[os.path.abspath(os.path.join(repo.root_dir, path))] = path
            targets = [
                def_path
                for fs_path, def_path in inputs.items()
                if fs_path in producer
                and producer[fs_path][0] not in stages
                and producer[fs_path][1].status()  # differs from the lock, or missing
            ]
            own = [  # its own last output, which it extends (the lock has one)
                out.def_path
                for out in stage.outs
                if out.persist and out.use_cache and out.hash_info and out.status()
            ]
            if own:
                before = cache_objects(cache_dir)
                try:
                    try:
                        repo.checkout(targets=own, force=True)
                    except CheckoutError:  # not in this machine's cache: from the remote
                        repo.pull(targets=own, force=True)
                except Exception as exc:  # noqa: BLE001 - the stage can do without
                    log.warning(
                        "stage %s: its last %s cannot be had (%s); it writes it whole",
                        name,
                        ", ".join(own),
                        exc,
                    )
                fetched[name] += added_bytes(before, cache_objects(cache_dir))
            if not targets:
                continue
            try:
                repo.checkout(targets=targets, force=True)
                continue
            except CheckoutError:  # not in this machine's cache: from the remote
                pass
            except Exception as exc:
                raise StageFailed(f"stage {name}: checking out its inputs failed: {exc}") from exc
            before = cache_objects(cache_dir)
            try:
                repo.pull(targets=targets, force=True)
            except Exception as exc:  # DVC, network and credential errors all stop the stage
                raise StageFailed(
                    f"stage {name}: pulling its inputs from {remote} failed: {exc}"
                ) from exc
            fetched[name] = added_bytes(before, cache_objects(cache_dir))
    return cache_dir, runs_dir, fetched


def push_outputs(
    workspace: Path, stages: list[str], run_cache_entries: list[Path] = ()
) -> dict[str, int]:
    """Send the stages' outputs the default remote lacks, then ``run_cache_entries`` (the
    run-cache files the stages that ran here just wrote); the bytes of the files sent, per
    stage.

    Outputs go first and an entry only after them, so a push that fails half-way leaves
    no run-cache entry on the remote whose outputs are missing there. (``dvc push
    --run-cache`` would send every entry of the local run cache first, and only log a
    failed copy.)"""
    from dvc.repo import Repo
    from dvc_objects.fs.generic import copy

    with Repo(str(workspace)) as repo:
        remote = default_remote(repo)
        by_name = {stage.addressing: stage for stage in repo.index.stages}
        outs = {
            Path(out.fs_path).relative_to(workspace.resolve()).as_posix(): name
            for name in stages
            for out in by_name[name].outs
            if out.use_cache
        }
        sent = dict.fromkeys(stages, 0)
        try:
            missing = repo.status(targets=stages, cloud=True)
            for path, status in missing.items():
                owner = next(
                    (s for o, s in outs.items() if path == o or path.startswith(o + "/")), None
                )
                if status == "new" and owner and (workspace / path).is_file():
                    sent[owner] += (workspace / path).stat().st_size
            if missing:
                repo.push(targets=stages)
            if run_cache_entries:
                odb = repo.cloud.get_remote_odb(
                    remote.name, "push --run-cache", hash_name="md5-dos2unix"
                )
                local = repo.cache.legacy
                for entry in run_cache_entries:
                    rel = Path(entry).relative_to(local.path).parts
                    copy(local.fs, str(entry), odb.fs, odb.fs.join(odb.path, *rel))
        except Exception as exc:
            raise StageFailed(
                f"stages {', '.join(stages)}: pushing outputs to {remote} failed: {exc}"
            ) from exc
        return sent


def pull_outputs(workspace: Path, log) -> int:
    """``dvc pull``: a distributed run's outputs into the orchestrating workspace, so that
    its dvc.lock and outputs agree (``dvc status`` clean). Returns the bytes fetched."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        cache_dir = Path(repo.cache.local.path)
        if not repo.status():  # this workspace already holds the run's outputs
            return 0
    before = cache_objects(cache_dir)
    try:
        run_dvc(["pull", "--force"], workspace, 7200, "dvc pull", log=log)
    except StageFailed as exc:
        with Repo(str(workspace)) as repo:
            raise StageFailed(
                f"pulling the run's outputs from {default_remote(repo)}: {exc}"
            ) from exc
    pulled = added_bytes(before, cache_objects(cache_dir))
    log.info("dvc pull: %d B into %s", pulled, workspace)
    return pulled
