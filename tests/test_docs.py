"""The docs a user reads (issue #40): the README stays a page, every command block marked
runnable runs (here, or in the test its marker names), and every relative link and anchor
resolves. The markers and the link rules: tests/support/docs.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import docs
from tests.support.project import REPO_ROOT, copy_project, git, tool_env

# Pages another open change adds (#36: followed and S3 sources, the model registry); the
# README links them already. Drop a name here once its page is on this branch.
RUN_HERE = [b for b in docs.runnable_blocks() if b.run_by is None]


def test_the_readme_is_a_page():
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move reference text to docs/"


def test_runnable_blocks_exist_and_name_tests_that_run_them():
    """Each block handed to another test names a test that reads its blocks through
    ``blocks_run_by``; and there are blocks to run here, so the test below checks something."""
    assert len(RUN_HERE) >= 3
    for block in docs.runnable_blocks():
        assert block.lang in ("bash", "python"), f"{block.where}: runnable {block.lang!r}?"
        if block.run_by is not None:
            test = REPO_ROOT / block.run_by
            assert test.is_file(), f"{block.where}: no test {block.run_by}"
            assert f'blocks_run_by("{block.run_by}")' in test.read_text(encoding="utf-8"), (
                f"{block.where}: {block.run_by} does not read its blocks (blocks_run_by)"
            )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project (code, params, flows, docs) in a git repository, with
    ``.venv`` this interpreter's venv, as ``make install`` leaves it."""
    root = copy_project(
        tmp_path_factory.mktemp("docs") / "project", extra=("flows", "prefect.yaml", "docs")
    )
    (root / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    git(root, "init", "-q")
    return root


@pytest.mark.parametrize("block", RUN_HERE, ids=[b.where for b in RUN_HERE])
def test_runnable_block_runs(block, project):
    """Typed as written into bash in the project's root, the venv not on PATH."""
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in tool_env().items() if k not in ("PIPELINE_PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if p and Path(p) != bindir
    )
    command = (
        ["bash", "-e", "-c", block.code]
        if block.lang == "bash"
        else [sys.executable, "-c", block.code]
    )
    done = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"{block.where} failed ({done.returncode}):\n{block.code}\n"
        f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )


@pytest.mark.parametrize(
    "page", docs.doc_files(), ids=[p.relative_to(REPO_ROOT).as_posix() for p in docs.doc_files()]
)
def test_relative_links_resolve(page):
    assert docs.broken_links(page) == []


def test_the_link_check_names_a_missing_file_and_a_missing_anchor(tmp_path):
    """The check itself, on a page with one good and two broken links."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Café au lait (2 cups)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "[ok](other.md#café-au-lait-2-cups) and [self](#title) and [web](https://x.test/a.md)\n"
        "[gone](missing.md) `[in code](nowhere.md)`\n"
        "```\n[in a block](nowhere.md)\n```\n"
        "[bad anchor](other.md#no-such-heading)\n"
    )
    assert docs.broken_links(page) == [
        "page.md:4: missing.md (no such file)",
        "page.md:8: other.md#no-such-heading (no heading #no-such-heading in other.md)",
    ]
