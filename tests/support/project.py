"""The project as the tests see it: its files, its stages in dvc.yaml's order, params from
params.yaml plus overrides, and copies of it to run DVC and git in."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Params, overlay, parse_params

REPO_ROOT = Path(__file__).resolve().parents[2]
CALTECH = REPO_ROOT.parent / "shared" / "datasets" / "101_ObjectCategories.tar.gz"
CALTECH_SHA256 = "842897447c5f67bcf307ace446d36dbef01baa40309bd9885cf20b3b394cabd6"
# What a copy of the project needs to run its stages under DVC.
PROJECT_FILES = (
    "bin",
    "pipeline",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
)


@cache
def dvc_yaml() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))


@cache
def repo_params() -> dict:
    """params.yaml as written: the one place defaults live."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


STAGES = tuple(dvc_yaml()["stages"])  # in dvc.yaml's order, which is the DAG's
# The stages DVC runs on every `dvc repro` (always_changed: the source fingerprint, a cheap
# look at data.source); `dvc status` always lists them as "always changed".
ALWAYS_RUN = tuple(
    name for name, stage in dvc_yaml()["stages"].items() if stage.get("always_changed")
)
# What each stage's task reports in a run that finds the pipeline up to date.
SETTLED = {**dict.fromkeys(STAGES, "up to date"), **dict.fromkeys(ALWAYS_RUN, "ran")}


def stages_run(output: str) -> list[str]:
    """The stages a ``dvc repro`` output says it ran, less those that run every time."""
    return [s for s in re.findall(r"Running stage '([^']+)'", output) if s not in ALWAYS_RUN]


def changed(status: dict) -> dict:
    """``dvc status --json`` less the stages that are always changed."""
    return {k: v for k, v in status.items() if v != ["always changed"] or k not in ALWAYS_RUN}


def up_to_date(status_text: str) -> bool:
    """``dvc status`` (text) says nothing needs to run but the stages that run every time."""
    if "up to date" in status_text:
        return True
    lines = [line for line in status_text.splitlines() if line.strip()]
    heads = {line.rstrip(":") for line in lines if not line.startswith(("\t", " "))}
    rest = {line.strip() for line in lines if line.startswith(("\t", " "))}
    return bool(lines) and heads <= set(ALWAYS_RUN) and rest == {"always changed"}


# The backbone of the tests that run the whole pipeline through DVC, Prefect or workers:
# timm's own test model (random weights, 160 px, 256-d features, 0.1 M parameters), so
# their time goes to what they check, the orchestration. A tiny run takes 90 s instead of
# Lite0's 120 s; the default backbone keeps its stage-level tests (TinyWorld's TINY, the
# export tests' real weights).
SMALL_BACKBONE = {"backbone": "timm:test_efficientnet", "weights": "none"}


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it, mapping by mapping (a deep copy)."""
    return copy.deepcopy(overlay(base, overrides))


def params_dict(**sections: Any) -> dict:
    """params.yaml with ``sections`` laid over it, e.g. ``head={"epochs": 5}``."""
    return merged(repo_params(), sections)


def params_with(**sections: Any) -> Params:
    """:class:`Params` from params.yaml with ``sections`` laid over it."""
    return parse_params(params_dict(**sections))


def params_from(overrides: dict) -> Params:
    """:class:`Params` from params.yaml with the mapping ``overrides`` laid over it."""
    return parse_params(merged(repo_params(), overrides))


def write_params(path: Path, **sections: Any) -> Path:
    """A complete params file: params.yaml with ``sections`` laid over it."""
    path.write_text(yaml.safe_dump(params_dict(**sections), sort_keys=False), encoding="utf-8")
    return path


def caltech_or_skip() -> Path:
    if not CALTECH.exists():
        pytest.skip(
            f"Caltech-101 archive not found at {CALTECH} (see ../shared/datasets/README.md)"
        )
    return CALTECH


def raw_files(root: Path = Path("data/raw")) -> dict[str, bytes]:
    """``<class>/<file>`` → bytes, for every image in the raw store at ``root``."""
    from pipeline.data.rawstore import RawStore

    store = RawStore.open(root)
    return {key: store.read_bytes(key) for key in store.index["path"]}


def raw_keys(root: Path = Path("data/raw")) -> set[str]:
    """The ``<class>/<file>`` of every image in the raw store at ``root``."""
    from pipeline.data.rawstore import RawStore

    return set(RawStore.open(root).index["path"])


def manifest(root: Path = Path(".")):
    """validate's manifest in the workspace ``root``, sorted by path."""
    from pipeline.data import segments

    return segments.read_table(root / "data/manifest", "path")


def split_rows(root: Path = Path("."), split: str | None = None):
    """The split table (path, label, sha256, split) in the workspace ``root``, sorted by
    path; with ``split``, that split's rows (path, label, sha256)."""
    from pipeline.data import segments
    from pipeline.data.splits import KEY, rows_of

    table = segments.read_table(root / "data/splits", KEY)
    return table if split is None else rows_of(table, split)


def write_split_rows(folder: Path, rows) -> None:
    """Write ``rows`` (path, label, sha256, split) as the split table at ``folder``, as the
    split stage does (over the table there, if any)."""
    from pipeline.data import segments
    from pipeline.data.splits import COLUMNS, KEY
    from pipeline.system.fsutil import atomic_path

    with atomic_path(folder) as tmp:
        segments.write_table(rows[COLUMNS], tmp, KEY, folder)


def tool_env() -> dict[str, str]:
    """The environment for dvc and the stages: this interpreter's tools first."""
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ["PATH"],
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["dvc", *args], cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    done = subprocess.run(["git", *identity, *args], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def set_params(repo: Path, **sections) -> None:
    """Change keys in ``repo``'s params.yaml (mapping by mapping)."""
    path = repo / "params.yaml"
    path.write_text(
        yaml.safe_dump(merged(yaml.safe_load(path.read_text()), sections), sort_keys=False)
    )


# The session's kept graph structures (engines.kept_graph), shared by the projects that
# copy_project makes: set by tests/conftest.py, None outside a test session.
SHARED_STRUCTURES: Path | None = None
STRUCTURES = "data/memo/graphs/structures"  # under params.yaml's paths.memo


def copy_project(root: Path, extra: tuple[str, ...] = ()) -> Path:
    """This project's files (code, DVC and params files) copied into a new folder ``root``.

    Its memo (``paths.memo``) starts with the session's kept graph structures (``SHARED_STRUCTURES``),
    as a user's cache holds them after a first run: each whole-pipeline test would otherwise
    export the same random-weights Lite0 and head again (20 s each on two cores). kept_graph
    checks each reused structure against the module; the first export of each structure,
    and the tests of kept_graph itself, run in every session.
    """
    root.mkdir()
    for name in (*PROJECT_FILES, *extra):
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / name)
    share_structures(root)
    return root


def share_structures(root: Path) -> None:
    """Point ``root``'s kept graph structures at the session's (``SHARED_STRUCTURES``)."""
    if SHARED_STRUCTURES is not None:
        SHARED_STRUCTURES.mkdir(parents=True, exist_ok=True)
        (root / STRUCTURES).parent.mkdir(parents=True, exist_ok=True)
        (root / STRUCTURES).symlink_to(SHARED_STRUCTURES, target_is_directory=True)


def pipeline_command(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` in the folder ``root``, with this checkout's code."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def project_warnings(output: str, root: Path) -> list[str]:
    """The lines of a run's output that warn about the tool rather than the data: DVC's
    ``WARNING`` lines (and any other package's logged ones), and Python warnings (``file:line:
    XWarning: ...``) raised in this project's files under ``root``. Not counted: another
    package's Python warning about its own code, and what our stages log at WARNING about
    the user's data and models (a soft check failed, a temperature fit at its bound): those
    are findings to read, and the report shows them too."""
    found = []
    for line in output.splitlines():
        # printed by Python, or routed into logging (``WARNING py.warnings: file:line: ...``)
        python_warning = re.search(r"(?:^|py\.warnings: )(\S+\.py):\d+: \w*Warning: ", line)
        if python_warning:
            if Path(python_warning.group(1)).resolve().is_relative_to(root.resolve()):
                found.append(line)
        elif "WARNING" in line and not re.search(r"\bWARNING (pipeline|flows)\.", line):
            found.append(line)
    return found
