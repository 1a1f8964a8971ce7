from __future__ import annotations

import ast
import dataclasses
import re
import shutil
import subprocess

import pytest
import yaml

from pipeline import config, stages
from pipeline.config import apply_overrides, load_params, overlay, parse_params, parse_section
from pipeline.errors import ConfigError
from pipeline.system.settingsdoc import leaves
from tests.support.project import (
    REPO_ROOT,
    STAGES,
    dvc_yaml,
    params_from,
    pipeline_command,
    repo_params,
)


def test_repo_params_load_into_typed_values():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.source == "builtin:digits-mini"
    assert params.data.exclude_classes == ("BACKGROUND_Google",)
    assert (params.split.ratios.train, params.split.ratios.val, params.split.ratios.test) == (
        0.7,
        0.1,
        0.2,
    )
    assert params.model.backbone == "efficientnet_lite0"


def test_the_stages_package_and_dvc_yaml_name_the_same_stages():
    """One module per dvc.yaml stage, each run by ``bin/stage <name>`` (issue #17)."""
    assert sorted(dvc_yaml()["stages"]) == list(stages.names())
    assert len(STAGES) == 13
    for name, stage in dvc_yaml()["stages"].items():
        assert stage["cmd"] == f"bin/stage {name}"


def test_params_yaml_is_the_only_place_defaults_are_written():
    """No field of config.py's dataclasses has a default: every value comes from params.yaml,
    and a key missing there is an error naming it (issue #17)."""
    tree = ast.parse((REPO_ROOT / "pipeline" / "config.py").read_text())
    defaults = [
        f"{cls.name}.{field.target.id}"
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for field in cls.body
        if isinstance(field, ast.AnnAssign) and field.value is not None
    ]
    assert defaults == []
    raw = repo_params()
    without = {**raw, "head": {k: v for k, v in raw["head"].items() if k != "lr"}}
    with pytest.raises(ConfigError, match="missing key 'head.lr'"):
        parse_params(without)
    with pytest.raises(ConfigError, match="missing key 'onnx_check'"):
        parse_params({k: v for k, v in raw.items() if k != "onnx_check"})


def test_every_param_dvc_yaml_names_exists():
    params = load_params(REPO_ROOT / "params.yaml")
    for name, stage in dvc_yaml()["stages"].items():
        for dotted in stage.get("params", []):
            node = params
            for part in dotted.split("."):
                assert dataclasses.is_dataclass(node), f"{name}: {dotted} goes below a leaf"
                assert part in {f.name for f in dataclasses.fields(node)}, (
                    f"{name}: unknown {dotted}"
                )
                node = getattr(node, part)


def test_every_path_dvc_yaml_templates_exists():
    text = (REPO_ROOT / "dvc.yaml").read_text()
    names = {f.name for f in dataclasses.fields(config.Paths)}
    for used in re.findall(r"\$\{paths\.(\w+)\}", text):
        assert used in names


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"splt": {}}, "unknown key 'splt' (did you mean 'split'?)"),
        ({"split": {"ratios": {"train": 0.7, "vall": 0.1}}}, "unknown key 'split.ratios.vall'"),
        ({"split": {"seed": "x"}}, "split.seed: expected int"),
        ({"split": {"seed": True}}, "split.seed: expected int"),
        ({"head": {"lr": "fast"}}, "head.lr: expected float > 0 or 'auto', got 'fast'"),
        (
            {"split": {"ratios": {"train": 0.5, "val": 0.1, "test": 0.1}}},
            "split.ratios must sum to 1",
        ),
        ({"data": {"sha256": "abc"}}, "data.sha256 must be 64 hex digits"),
        (
            {"data": {"exclude_classes": "BACKGROUND_Google"}},
            "data.exclude_classes: expected a list",
        ),
        ({"data": []}, "data must be a mapping"),
        ({"model": {"weights": "random"}}, "model.weights: expected one of ['imagenet', 'none']"),
    ],
)
def test_bad_params_fail_with_the_dotted_key(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_params(overlay(repo_params(), raw))
    assert message in str(info.value)


def test_values_are_typed():
    params = params_from(
        {
            "head": {"lr": "1e-3"},
            "download": {"timeout_s": 5},
            "split": {"train_per_class": 30},
            "validate": {"min_images_per_class": 32},
        }
    )
    assert params.head.lr == 0.001
    assert params.download.timeout_s == 5.0 and isinstance(params.download.timeout_s, float)
    assert params.split.train_per_class == 30
    assert params_from({"head": {"lr": "auto"}}).head.lr == "auto"
    assert dataclasses.is_dataclass(params) and params.__dataclass_params__.frozen


def test_load_params_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(overlay(repo_params(), {"split": {"sede": 1}})))
    with pytest.raises(
        ConfigError, match=r"params.yaml: unknown key 'split.sede' \(did you mean 'split.seed'\?\)"
    ):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_prefect_yaml_targets_the_pools_params_yaml_names():
    """prefect.yaml must spell the pool names out (prefect deploy checks a pool exists
    before it fills in templates); they stay flows.pools, the one setting."""
    deployments = {
        d["name"]: d["work_pool"]["name"]
        for d in yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())["deployments"]
    }
    pools = repo_params()["flows"]["pools"]
    assert deployments == {
        "scheduled": pools["gpu"],
        "watch": pools["cpu"],  # the source sensor
        "distributed": pools["cpu"],
        "gpu": pools["gpu"],
        "cpu": pools["cpu"],
    }
    placements = {stage["meta"]["placement"] for stage in dvc_yaml()["stages"].values()}
    assert placements <= set(pools) and placements <= set(deployments)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # Issue #37's table: each used to give a traceback, or a model at chance level.
        ({"head": {"lr": -5}}, "head.lr: expected float > 0 or 'auto', got -5"),
        ({"head": {"batch_size": 0}}, "head.batch_size: expected int >= 1, got 0"),
        ({"head": {"dropout": 1.5}}, "head.dropout: expected float >= 0 and < 1, got 1.5"),
        ({"head": {"patience": -1}}, "head.patience: expected int >= 1, got -1"),
        ({"head": {"hidden": 0}}, "head.hidden: expected int >= 1 and <= 65536, got 0"),
        ({"head": {"lr": ".nan"}}, "head.lr: expected float > 0 or 'auto', got '.nan'"),
        (
            {"download": {"timeout_s": 1e400}},
            "download.timeout_s: expected a finite float, got inf",
        ),
        ({"split": {"seed": -1}}, "split.seed: expected int >= 0 and < 4294967296, got -1"),
        ({"split": {"ratios": {"val": 0}}}, "split.ratios.val: expected float > 0 and < 1, got 0"),
        (
            {"finetune": {"unfreeze_blocks": 0}},
            "finetune.unfreeze_blocks: expected int >= 1 or 'all'",
        ),
        ({"finetune": {"max_grad_norm": 0}}, "finetune.max_grad_norm: expected float > 0 or null"),
        (
            {"features": {"augment": {"jitter": 0.7}}},
            "features.augment.jitter: expected float >= 0",
        ),
        ({"export": {"opset": 99}}, "export.opset: expected int >= 17 and <= 23, got 99"),
        (
            {"flows": {"timeouts_s": {"default": -1}}},
            "flows.timeouts_s.default: expected float > 0",
        ),
        ({"flows": {"timezone": "Mars/Base"}}, "flows.timezone: expected an IANA time zone"),
        ({"data": {"source": ""}}, "data.source: expected non-empty str, got ''"),
        ({"head": {"epochs": 2**70}}, "head.epochs: expected an int of at most 63 bits"),
        # Rules across keys.
        ({"validate": {"max_side": 8}}, "validate.max_side: expected >= validate.min_side (16)"),
        (
            {"validate": {"max_pixels": 100}},
            "validate.max_pixels: expected >= validate.min_side squared",
        ),
        (
            {"split": {"train_per_class": 30}},
            "validate.min_images_per_class: expected >= 32, the fewest images split can share out "
            "(split.train_per_class: 30), got 5; or set split.drop_small_classes: true",
        ),
    ],
)
def test_values_outside_what_a_key_accepts_fail_at_load_in_one_line(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_params(overlay(repo_params(), raw))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_auto_null_and_the_edges_of_each_range_keep_their_meaning():
    params = params_from(
        {
            "head": {"lr": "auto", "dropout": 0, "label_smoothing": 0.0, "hidden": 1},
            "finetune": {"epochs": 0, "unfreeze_blocks": "all", "max_grad_norm": None},
            "split": {"train_per_class": 30, "drop_small_classes": True, "seed": 2**32 - 1},
            "onnx_check": {"min_top1_agreement": 1, "max_int8_drop": 0},
            "export": {"opset": 17},
        }
    )
    assert (params.head.lr, params.head.dropout, params.finetune.max_grad_norm) == ("auto", 0, None)
    assert params.split.train_per_class == 30 and params.onnx_check.min_top1_agreement == 1.0


def settings_command(root, *args: str) -> subprocess.CompletedProcess:
    return pipeline_command(root, "settings", *args)


def test_the_settings_reference_is_generated_from_the_declaration_and_cannot_drift(tmp_path):
    """docs/settings.md lists every leaf key with its default, what it accepts and the
    stages that read it; `settings --check` fails once params.yaml says otherwise."""
    assert settings_command(REPO_ROOT, "--check").returncode == 0
    page = (REPO_ROOT / "docs" / "settings.md").read_text()
    assert "| `head.lr` | `0.001` | float > 0 or 'auto' | export, train_head |" in page
    assert "| `head.dropout` | `0.3` | float >= 0 and < 1 | export, train_head |" in page
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert len(rows) == len(leaves(repo_params()))

    for name in ("params.yaml", "dvc.yaml", "docs/settings.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    assert settings_command(tmp_path, "--check").returncode == 0
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace("  dropout: 0.3\n", "  dropout: 0.2\n"))
    checked = settings_command(tmp_path, "--check")
    assert checked.returncode == 1
    assert checked.stderr.strip() == (
        "docs/settings.md: differs from params.yaml and config.py: "
        "run `python -m pipeline settings --write`"
    )
    assert settings_command(tmp_path, "--write").returncode == 0
    assert "| `head.dropout` | `0.2` |" in (tmp_path / "docs" / "settings.md").read_text()


def test_an_override_changes_its_value_and_keeps_the_files_comments():
    text = (REPO_ROOT / "params.yaml").read_text()
    changed = apply_overrides(text, {"head.lr": 0.0005, "flows.timeouts_s.finetune": 60})
    params = parse_params(yaml.safe_load(changed))
    assert params.head.lr == 0.0005
    assert params.flows.timeout_for("finetune") == 60  # a new entry in a mapping-valued key
    assert changed.startswith("# The one place for settings")
    before, after = yaml.safe_load(text), yaml.safe_load(changed)
    assert {k: v for k, v in after.items() if k not in ("head", "flows")} == {
        k: v for k, v in before.items() if k not in ("head", "flows")
    }
    assert {k: v for k, v in after["head"].items() if k != "lr"} == {
        k: v for k, v in before["head"].items() if k != "lr"
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"head.lrr": 0.1}, "unknown key 'head.lrr' (did you mean 'head.lr'?)"),
        ({"heads.lr": 0.1}, "unknown key 'heads' (did you mean 'head'?)"),
        ({"split.ratios.vall": 0.1}, "unknown key 'split.ratios.vall'"),
        ({"head.epochs": "many"}, "head.epochs: expected int, got str 'many'"),
        ({"head.lr.x": 1}, "head.lr: expected float > 0 or 'auto'"),
        ({"head.lr": -5}, "head.lr: expected float > 0 or 'auto', got -5"),
        ({"head.dropout": 1.5}, "head.dropout: expected float >= 0 and < 1, got 1.5"),
        ({"split.ratios.train": 0.9}, "split.ratios must sum to 1"),
    ],
)
def test_a_bad_override_fails_on_one_line_naming_its_dotted_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides((REPO_ROOT / "params.yaml").read_text(), overrides)
    assert message in str(info.value)
    assert str(info.value).startswith(f"overrides {next(iter(overrides))}: ")
    assert "\n" not in str(info.value)


def test_a_section_reads_alone_and_strictly():
    """A pool's worker reads the flows section of a run's params with code that may not
    know a key the run's commit added elsewhere; its own section is still checked."""
    raw = overlay(repo_params(), {"finetune": {"added_later": 1}})
    assert parse_section(raw, "flows") == load_params(REPO_ROOT / "params.yaml").flows
    with pytest.raises(ConfigError, match="unknown key 'finetune.added_later'"):
        parse_params(raw)
    with pytest.raises(ConfigError, match=r"flows.retry_delay_s: expected float"):
        parse_section(overlay(raw, {"flows": {"retry_delay_s": "soon"}}), "flows")
    with pytest.raises(ConfigError, match="missing key 'flows'"):
        parse_section({k: v for k, v in raw.items() if k != "flows"}, "flows")
