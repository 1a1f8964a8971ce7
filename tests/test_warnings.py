"""No warning the project causes (issue #40): a user who sees warnings on every run learns
to ignore them, and then misses a real one. ``dvc repro`` on tiny data prints none (DVC
warned about ``pipeline/__init__.py`` being empty, three times before each stage), and our
own modules raise no DeprecationWarning when imported."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

from tests.support.images import create_image_folder
from tests.support.project import (
    REPO_ROOT,
    copy_project,
    git,
    project_warnings,
    set_params,
    tool_env,
)


def run_dvc(repo, *args: str) -> subprocess.CompletedProcess:
    """``dvc ARGS`` with Python's DeprecationWarnings shown, as a developer would see them."""
    env = {**tool_env(), "PYTHONWARNINGS": "default::DeprecationWarning"}
    return subprocess.run(
        ["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # 18-20 s on two cores (three stages through DVC, twice)
def test_dvc_repro_on_tiny_data_prints_no_project_warning(tmp_path):
    repo = copy_project(tmp_path / "repo")
    git(repo, "init", "-q")
    images = create_image_folder(tmp_path / "images", {"cat": 12, "dog": 12, "bird": 12})
    set_params(repo, data={"source": str(images)})
    done = run_dvc(repo, "repro", "split")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Running stage 'split'" in done.stdout
    assert project_warnings(done.stdout + done.stderr, repo) == []

    # The check sees the warning this issue removed: an empty dep file, as before.
    (repo / "pipeline/__init__.py").write_text("")
    rerun = run_dvc(repo, "repro", "split")
    assert any(
        "'pipeline/__init__.py' is empty" in line
        for line in project_warnings(rerun.stdout + rerun.stderr, repo)
    )


def test_no_code_dep_in_dvc_yaml_is_an_empty_file():
    """DVC warns about every empty dependency file on every command; the cheap guard."""
    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    deps = {d for stage in stages.values() for d in stage.get("deps", []) if d.endswith(".py")}
    assert deps and [d for d in sorted(deps) if (REPO_ROOT / d).stat().st_size == 0] == []


def our_modules() -> list[str]:
    names = []
    for package in ("pipeline", "flows"):
        names.append(package)
        for module in pkgutil.walk_packages([str(REPO_ROOT / package)], prefix=f"{package}."):
            if module.name not in ("pipeline.__main__", "flows.__main__"):
                names.append(module.name)
    return names


def test_our_modules_import_without_deprecation_warnings():
    """Every module of pipeline/ and flows/ imported in a fresh interpreter in which a
    DeprecationWarning raised from our own code is an error (other packages' are theirs)."""
    modules = our_modules()
    assert len(modules) > 40
    code = (
        "import importlib, sys, warnings\n"
        "warnings.filterwarnings('error', category=DeprecationWarning,"
        " module=r'(pipeline|flows)(\\.|$)')\n"
        "warnings.filterwarnings('error', category=PendingDeprecationWarning,"
        " module=r'(pipeline|flows)(\\.|$)')\n"
        "for name in sys.argv[1:]:\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *modules],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
