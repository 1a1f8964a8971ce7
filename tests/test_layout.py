"""The tree is the pipeline (issue #17): stages in one package that nothing imports, each
stage's code deps in dvc.yaml exactly its import closure, and facts written once."""

from __future__ import annotations

import json
import subprocess

import pytest

from pipeline.system import codedeps
from pipeline.system.provenance import model_param_keys, model_params
from tests.support.images import create_image_folder
from tests.support.imports import import_without
from tests.support.project import (
    REPO_ROOT,
    SMALL_BACKBONE,
    STAGES,
    changed,
    copy_project,
    dvc,
    dvc_yaml,
    git,
    params_with,
    pipeline_command,
    set_params,
)

PIPELINE = REPO_ROOT / "pipeline"
STAGE_FILES = {PIPELINE / "stages" / f"{stage}.py" for stage in STAGES}


def code_deps(stage: str) -> set[str]:
    return {d for d in dvc_yaml()["stages"][stage]["deps"] if d.endswith(".py")}


def stage_closure(stage: str) -> set[str]:
    return set(codedeps.stage_closure(stage, REPO_ROOT))


def direct_imports(file):
    return codedeps.direct_imports(file, REPO_ROOT)


def deps_command(root, *args: str) -> subprocess.CompletedProcess:
    return pipeline_command(root, "deps", *args)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_each_stages_import_closure(stage):
    """DVC reruns a stage when a file it lists changes, so a stage must list every project
    file it runs (a support function edited elsewhere) and no other (an edit to code it
    never runs would rerun it for nothing)."""
    closure, listed = stage_closure(stage), code_deps(stage)
    fix = f"run `{codedeps.FIX}`"
    assert not closure - listed, f"dvc.yaml's {stage} deps miss {sorted(closure - listed)}: {fix}"
    assert not listed - closure, f"dvc.yaml's {stage} deps list {sorted(listed - closure)}: {fix}"


def test_deps_check_passes_here_and_names_the_stage_and_file_a_removed_line_leaves_out(
    tmp_path,
):
    """`python -m pipeline deps --check` holds dvc.yaml to the imports; `--write` puts a
    removed line back and leaves every other byte (comments, data deps) as it was."""
    assert deps_command(REPO_ROOT, "--check").returncode == 0
    root = tmp_path / "project"
    root.mkdir()
    (root / "pipeline").symlink_to(REPO_ROOT / "pipeline")
    original = (REPO_ROOT / "dvc.yaml").read_text()
    line = "      - pipeline/modeling/training.py\n"
    start = original.index("  finetune:\n")
    cut = original.index(line, start)
    (root / "dvc.yaml").write_text(original[:cut] + original[cut + len(line) :])

    checked = deps_command(root, "--check")
    assert checked.returncode == 1
    assert checked.stderr.splitlines() == [
        "dvc.yaml: stage finetune deps misses pipeline/modeling/training.py, which it imports",
        "run `python -m pipeline deps --write` to fix",
    ]
    written = deps_command(root, "--write")
    assert written.returncode == 0, written.stderr
    assert (root / "dvc.yaml").read_text() == original
    assert deps_command(root, "--check").returncode == 0


def test_deps_check_names_a_file_a_stage_lists_but_does_not_run_and_a_missing_param(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "pipeline").symlink_to(REPO_ROOT / "pipeline")
    text = (REPO_ROOT / "dvc.yaml").read_text()
    text = text.replace(
        "      - pipeline/stages/split.py\n",
        "      - pipeline/stages/split.py\n      - pipeline/serving/predict.py\n",
    ).replace("      - export.opset\n", "")
    (root / "dvc.yaml").write_text(text)
    checked = deps_command(root, "--check")
    assert checked.returncode == 1
    assert checked.stderr.splitlines()[:2] == [
        "dvc.yaml: stage split deps lists pipeline/serving/predict.py, which it does not import",
        "dvc.yaml: stage export params misses export.opset, which it hashes",
    ]


def test_the_closure_follows_lazy_and_nested_imports():
    closure = stage_closure("train_head")
    assert "pipeline/modeling/training.py" in closure  # train_head's loss and guards
    assert "pipeline/data/featurestore.py" in closure
    assert "pipeline/runner.py" in closure and "pipeline/__main__.py" in closure
    assert "pipeline/serving/predict.py" not in closure  # only on `predict`'s path
    assert "pipeline/stages/features.py" not in closure
    # onnx_check imports onnxruntime's classifier lazily, inside functions: still followed.
    assert "pipeline/serving/predict.py" in stage_closure("onnx_check")


def test_no_module_imports_a_stage():
    """What two stages share lives in a support package; only the CLI runs a stage (by
    name), and tests and bench import them."""
    offenders = []
    for file in sorted(PIPELINE.rglob("*.py")):
        imported = {f for f in direct_imports(file) if f in STAGE_FILES}
        if imported:
            offenders.append(f"{file.relative_to(REPO_ROOT)} imports {sorted(map(str, imported))}")
    assert offenders == []


def test_support_packages_import_without_torch():
    """The torch-free paths (the predictor, data checks, reporting figures) stay torch-free."""
    modules = [
        "pipeline.serving.predict",
        "pipeline.serving.followed",
        "pipeline.registry.store",
        "pipeline.registry.cli",
        "pipeline.data.images",
        "pipeline.data.preprocessing",
        "pipeline.data.expectations",
        "pipeline.data.splits",
        "pipeline.data.featurestore",
        "pipeline.reporting.significance",
        "pipeline.reporting.headline",
        "pipeline.system.cpu",
    ]
    done = import_without(("torch", "torchvision", "timm"), modules)
    assert done.returncode == 0, done.stderr


def test_head_stages_import_no_table_library():
    """train_head and finetune read no table on a head experiment (finetune.epochs: 0), so
    they import without pandas: its 0.25-0.3 s came before each of them started its work."""
    done = import_without(("pandas",), ["pipeline.stages.train_head", "pipeline.stages.finetune"])
    assert done.returncode == 0, done.stderr


def test_export_lists_every_param_its_metadata_hashes():
    """The ONNX file's params_sha256 hashes the settings that made the model; dvc.yaml must
    list exactly those for export, or a changed one leaves a stale hash in the file."""
    listed = dvc_yaml()["stages"]["export"]["params"]
    assert listed == list(model_params(params_with())) == model_param_keys()


def test_placement_lives_in_dvc_yaml():
    """The stages that run the network want the GPU pool; everything else the CPU one."""
    placement = {name: s["meta"]["placement"] for name, s in dvc_yaml()["stages"].items()}
    gpu = {"features", "train_head", "finetune", "evaluate"}
    assert placement == {name: "gpu" if name in gpu else "cpu" for name in STAGES}


def test_the_images_a_stage_reads_are_vouched_for_by_its_split_tables():
    """Only validate lists the image folder as a dep, and hashes every file into the split
    tables; each stage that reads the images lists those tables instead, and names the
    folder under meta.reads for the distributed flow to pull (DVC hashing the folder again
    for each stage cost seconds per ``dvc repro`` on Caltech-101)."""
    stages = dvc_yaml()["stages"]
    listing = [name for name, s in stages.items() if "${paths.raw}" in s.get("deps", [])]
    assert listing == ["validate"]
    readers = {name for name, s in stages.items() if s["meta"].get("reads") == ["${paths.raw}"]}
    assert readers == {
        "features",
        "finetune",
        "evaluate",
        "export",
        "onnx_check",
        "promote",
        "report",
    }
    assert all("${paths.splits}" in stages[name]["deps"] for name in readers)


def test_effort_only_keys_rerun_nothing():
    """Keys that only say how hard to try are read but not DVC params."""
    stages = dvc_yaml()["stages"]
    listed = {key for stage in stages.values() for key in stage.get("params", [])}
    for key in (
        "download.retries",
        "download.timeout_s",
        "validate.allow_class_change",
        "finetune.checkpoint_every_steps",
        "promote.lock_timeout_s",
        "promote.lock_lease_s",
    ):
        assert key not in listed
    assert all(not key.startswith("flows") for key in listed)  # no stage reads it
    for stage in stages.values():  # no whole sections: every key by name
        assert all("." in key for key in stage.get("params", [])), stage["params"]


@pytest.mark.slow
def test_editing_a_support_function_reruns_the_stages_that_run_it(tmp_path):
    """A change to the training loss in pipeline/modeling/training.py (used by train_head
    and finetune) makes DVC call train_head and what follows changed, and leaves the data
    stages and features up to date."""
    repo = copy_project(tmp_path / "repo")
    git(repo, "init", "-q")
    images = create_image_folder(tmp_path / "images", {"cat": 6, "dog": 6})
    set_params(
        repo,
        data={"source": str(images)},
        model=SMALL_BACKBONE,
        head={"epochs": 2},
        device="cpu",
    )
    dvc(repo, "repro", "train_head")
    assert changed(json.loads(dvc(repo, "status", "--json", "train_head"))) == {}
    # Code train_head never runs (onnx_check's predictor): nothing it depends on changed.
    unrelated = repo / "pipeline" / "serving" / "predict.py"
    unrelated.write_text(unrelated.read_text() + "\n# edited\n")
    assert changed(json.loads(dvc(repo, "status", "--json", "train_head"))) == {}
    support = repo / "pipeline" / "modeling" / "training.py"
    support.write_text(
        support.read_text().replace(
            "    weight = class_weights(y, n_classes) if class_balanced else None",
            "    weight = class_weights(y, n_classes) if class_balanced else None  # edited",
        )
    )
    changed_stages = set(changed(json.loads(dvc(repo, "status", "--json"))))
    assert {"train_head", "finetune"} <= changed_stages
    assert not changed_stages & {"download", "validate", "split", "features"}
