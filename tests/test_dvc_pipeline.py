"""End to end through DVC itself, in a copy of the repository (slow: spawns dvc)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.support.browser import SECTIONS, browser_available, open_page, section_headings
from tests.support.docs import blocks_run_by, prose
from tests.support.httpserver import ServedFiles
from tests.support.images import create_image_folder
from tests.support.project import (
    CALTECH_SHA256,
    REPO_ROOT,
    SMALL_BACKBONE,
    STAGES,
    caltech_or_skip,
    changed,
    copy_project,
    dvc,
    git,
    project_warnings,
    set_params,
    split_rows,
    stages_run,
    tool_env,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repository holding this project's files."""
    root = copy_project(tmp_path / "repo")
    git(root, "init", "-q")
    return root


def test_repro_is_incremental(repo, tmp_path):
    images = create_image_folder(tmp_path / "images", {"cat": 12, "dog": 12, "bird": 12})
    set_params(repo, data={"source": str(images)})

    first = dvc(repo, "repro", "split")
    assert [s in first for s in ("'download'", "'validate'", "'split'")] == [True] * 3
    assert not stages_run(dvc(repo, "repro", "split"))
    train = split_rows(repo, "train")
    assert len(train) == 3 * 8 and set(train["label"]) == {"cat", "dog", "bird"}

    set_params(repo, split={"seed": 7})
    status = json.loads(dvc(repo, "status", "--json", "split"))
    assert list(changed(status)) == ["split"]  # download and validate are up to date
    second = dvc(repo, "repro", "split")
    assert "Running stage 'split'" in second
    assert "Running stage 'download'" not in second and "Running stage 'validate'" not in second
    assert not split_rows(repo, "train").equals(train)


@pytest.mark.caltech
def test_caltech_over_loopback_http(repo):
    archive = caltech_or_skip()
    with ServedFiles(archive.parent) as server:
        set_params(repo, data={"source": server.url("/" + archive.name), "sha256": CALTECH_SHA256})
        dvc(repo, "repro", "split")
        assert not stages_run(dvc(repo, "repro", "split"))
    validated = json.loads((repo / "metrics/validate.json").read_text())
    assert (validated["images"], validated["classes"]) == (8677, 101)
    assert "BACKGROUND_Google" not in validated["class_counts"]

    splits = {s: split_rows(repo, s) for s in ("train", "val", "test")}
    both = pd.concat([df.assign(split=s) for s, df in splits.items()])
    assert len(both) == 8677 and both["path"].is_unique
    assert both.groupby("sha256")["split"].nunique().max() == 1
    ratios = yaml.safe_load((repo / "params.yaml").read_text())["split"]["ratios"]
    sizes = both.groupby("label").size()
    for (label, split), count in both.groupby(["label", "split"]).size().items():
        assert abs(count - ratios[split] * sizes[label]) <= 2, (label, split, count)


def bench(script: str, repo: Path, *args: str) -> dict:
    """Run one of bench/'s scripts on ``repo`` and return the JSON it prints."""
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / script), "--root", str(repo), *args],
        capture_output=True,
        text=True,
        env=tool_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def check_benchmarks_run(repo: Path) -> None:
    """Smoke runs of the benchmarks on a finished workspace (figures: BENCHMARKS.md)."""
    speed = bench("features_speed.py", repo, "--limit", "12", "--forward-batches", "1")
    assert speed["images"] == 12 and speed["engine"] == "onnxruntime-fp32"
    assert min(speed["baseline_ips"], speed["stage_ips"], speed["forward_only_ips"]) > 0
    onnx = bench("onnx_speed.py", repo, "--rounds", "1", "--repeats", "1")
    assert set(onnx["images_per_second"]) == {"eager", "onnx_fp32", "onnx_int8"}
    assert onnx["int8_vs_fp32"] > 0 and onnx["test_top1"]["onnx_fp32"] is not None
    overhead = bench("dvc_overhead.py", repo, "--repeat", "1")
    head = overhead["head_lr_change"]
    after_head = STAGES[STAGES.index("train_head") :]
    assert head["stages_ran"] == [s for s in after_head if s != "data_issues"]
    # data_issues reads the features, not the head
    assert {"download", "validate", "split", "features", "data_issues"} <= set(
        head["stages_not_ran"]
    )
    assert all(entry["peak_rss_mb"] > 50 for entry in head["per_stage"].values())
    # DVC's run cache restores every stage but promote, which registers each candidate (an
    # uncached output: docs/registry.md), and the report on promote's figures.
    assert overhead["restore_original_params"]["stages_ran"] == ["promote", "report"]
    assert not stages_run(dvc(repo, "repro"))  # the original params, restored
    startup = bench("stage_startup.py", repo, "--repeat", "2", "--stage", "report")
    assert [0 < seconds < 60 for seconds in startup[str(repo.resolve())]["report"]] == [True] * 2


def readme_dvc_commands() -> list[str]:
    """Every DVC command the README tells a user to type (``.venv/bin/dvc ...``), in order:
    the lines of the blocks marked as run by this test (tests/support/docs.py) and the
    commands quoted in the README's prose, comments removed."""
    readme = REPO_ROOT / "README.md"
    commands = []
    for block in blocks_run_by("tests/test_dvc_pipeline.py"):
        for line in block.code.splitlines():
            if line.startswith(".venv/bin/dvc"):
                commands.append(line.split("  #")[0].strip())
    for _, line in prose(readme, keep_code=True):
        commands += re.findall(r"`(\.venv/bin/dvc [^`]*)`", line)
    return list(dict.fromkeys(commands))


def as_typed(repo: Path, command: str) -> subprocess.CompletedProcess:
    """``command`` typed into a fresh shell in ``repo``, the venv neither active nor on PATH
    (``repo/.venv`` is this interpreter's venv, as ``make install`` would have made it)."""
    venv = repo / ".venv"
    if not venv.exists():
        venv.symlink_to(sys.prefix, target_is_directory=True)
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p) != Path(bindir)
    )
    env = {k: v for k, v in tool_env().items() if k not in ("PIPELINE_PYTHON", "VIRTUAL_ENV")}
    env["PATH"] = path
    for role in ("AUTHOR", "COMMITTER"):  # `dvc exp run` commits; a user has an identity
        env.setdefault(f"GIT_{role}_NAME", "test")
        env.setdefault(f"GIT_{role}_EMAIL", "test@localhost")
    done = subprocess.run(
        ["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_full_pipeline_reruns_only_what_a_head_change_affects(repo, tmp_path):
    """The README's DVC commands, typed as written in a shell without the venv on PATH
    (issue #16): the pipeline, a head experiment that reruns only what follows the head,
    the metrics and the plots."""
    commands = readme_dvc_commands()
    repro = ".venv/bin/dvc repro"
    experiment = next(c for c in commands if " exp run -S head.lr=" in c)
    others = [".venv/bin/dvc metrics show", ".venv/bin/dvc plots show"]
    assert set(commands) == {repro, experiment, *others}, (
        f"the README's DVC commands changed; run each here: {commands}"
    )
    # A class folder whose name is HTML: the report must show it as text.
    hostile = "<img src=x onerror=alert(1)>"
    images = create_image_folder(tmp_path / "images", {"cat": 12, "dog": 12, hostile: 12})
    set_params(
        repo,
        data={"source": str(images)},
        model=SMALL_BACKBONE,
        head={"epochs": 5},
        # a head experiment, as the README runs one (the flow tests fine-tune through DVC)
        finetune={"epochs": 0},
        export={"calibration_images": 4},  # one small int8 calibration batch
        # random weights on noise images: int8 may flip a near-chance prediction or two
        onnx_check={"max_int8_drop": 1.0, "latency_runs": 5, "throughput_batches": 1},
    )
    first_run = as_typed(repo, repro)
    first = first_run.stdout
    # No warning the project causes (#40), e.g. DVC's about an empty dep file.
    assert project_warnings(first_run.stdout + first_run.stderr, repo) == []
    assert "Running stage 'report'" in first
    assert not stages_run(dvc(repo, "repro"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first run")
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluated) == {"head", "finetuned"}

    second = as_typed(repo, experiment).stdout
    for stage in ("train_head", "finetune", "evaluate", "export", "onnx_check"):
        assert f"Running stage '{stage}'" in second
    for stage in ("download", "validate", "split", "features"):
        assert f"Running stage '{stage}'" not in second
    assert "Reproducing experiment" in second and "Experiment" in second  # exp show's table
    lr = experiment.split("head.lr=")[1].split()[0]
    assert re.search(rf'"lr": ?{re.escape(lr)}\b', dvc(repo, "exp", "show", "--json"))
    for command in others:
        as_typed(repo, command)
    metrics = dvc(repo, "metrics", "show", "--json")
    assert "finetuned" in metrics and "top1" in metrics and "max_abs_diff" in metrics
    checked = json.loads((repo / "metrics/onnx_check.json").read_text())
    assert checked["passed"] and checked["max_abs_diff"] <= 1e-4

    assert "Running stage 'report'" in second
    evaluated = json.loads((repo / "metrics/evaluate.json").read_text())
    page = repo / "reports/index.html"
    html = page.read_text(encoding="utf-8")
    for model in ("head", "finetuned"):
        assert f"{evaluated[model]['top1']:.4f}" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img src=x" not in html
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    onnx_md5 = next(o["md5"] for o in lock["export"]["outs"] if o["path"] == "models/model.onnx")
    assert onnx_md5[:10] in html  # provenance from dvc.lock

    # The same curves and confusion matrix as DVC plots, each drawn once; diffable.
    shown = json.loads(dvc(repo, "plots", "show", "--json"))["data"]
    assert set(shown) == {"loss", "accuracy", "confusion"}
    diffed = json.loads(dvc(repo, "plots", "diff", "--json"))["data"]
    assert diffed["loss"][0]["revisions"] == ["workspace", "HEAD"]
    check_benchmarks_run(repo)
    if not browser_available():
        return  # tests/test_report.py says why it skips its browser test
    with open_page(page, tmp_path / "profile") as visit:
        assert section_headings(visit.page) == SECTIONS
        assert visit.page.get_by_text(hostile, exact=True).count() >= 2
        # train_head's 2 curves, 2 bar charts, 1 heat map (no fine-tuning curves at 0 epochs;
        # tests/test_report.py checks all 7)
        assert visit.page.locator("svg.chart").count() == 5
        visit.page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert visit.console_errors == visit.page_errors == visit.dialogs == []
        assert visit.outside_requests == []
