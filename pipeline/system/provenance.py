"""Where a run's outputs came from: the git commit, the settings that shaped the model,
and DVC's record of each stage.

Read by export (into the ONNX metadata) and by the run report; light on purpose (no
torch), so the report and the Prefect flow can import it cheaply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params

# The sections that shape the exported file; paths, download effort, device and the
# checks that run after export do not. Within them, keys that only say how hard to try
# or let a check pass change no output. The rest are hashed into the file's metadata
# (params_sha256), so dvc.yaml lists exactly these keys as export's params (written by
# `python -m pipeline deps --write`): a changed one reruns export and the hash in the file is never stale.
MODEL_SECTIONS = (
    "data",
    "validate",
    "split",
    "model",
    "features",
    "head",
    "finetune",
    "evaluate",
    "export",
)
NOT_HASHED = frozenset({"validate.allow_class_change", "finetune.checkpoint_every_steps"})


def model_params(params: Params) -> dict[str, Any]:
    """The settings that made this model, by dotted key (``split.ratios`` whole)."""
    return {
        f"{section}.{field.name}": getattr(getattr(params, section), field.name)
        for section in MODEL_SECTIONS
        for field in dataclasses.fields(getattr(params, section))
        if f"{section}.{field.name}" not in NOT_HASHED
    }


def model_param_keys() -> list[str]:
    """The dotted keys ``model_params`` returns, in its order, from the types alone."""
    sections = typing.get_type_hints(Params)
    return [
        f"{section}.{field.name}"
        for section in MODEL_SECTIONS
        for field in dataclasses.fields(sections[section])
        if f"{section}.{field.name}" not in NOT_HASHED
    ]


def params_sha256(params: Params) -> str:
    """A hash of the settings that made this model, to trace a file back to its params."""
    values = {
        key: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        for key, v in model_params(params).items()
    }
    canonical = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


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
