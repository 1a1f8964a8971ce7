"""Where a run's outputs came from: the git commit, and DVC's record of each stage.

Read by export (into the ONNX metadata) and by the run report; light on purpose (no
torch), so the report and the Prefect flow can import it cheaply.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_revision() -> dict[str, str]:
    """The commit the code came from, and whether tracked files differed from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def dvc_lock_stages(lock_file: Path = Path("dvc.lock")) -> dict[str, dict]:
    """Each stage's entry in ``dvc.lock``: the command, params and hashes DVC recorded.

    During ``dvc repro`` DVC writes a stage's entry as soon as the stage finishes, so a
    stage that runs last sees every earlier stage of the run. ``{}`` when there is none yet.
    """
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    stages = lock.get("stages", {}) if isinstance(lock, dict) else {}
    return stages if isinstance(stages, dict) else {}
