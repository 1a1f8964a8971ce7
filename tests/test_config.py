from __future__ import annotations

import dataclasses

import pytest
import yaml

from pipeline import __main__
from pipeline.config import Params, load_params, parse_params
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT

STAGES = [
    "download",
    "validate",
    "split",
    "features",
    "train_head",
    "finetune",
    "evaluate",
    "export",
    "onnx_check",
    "report",
]


def test_repo_params_load_and_match_defaults():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.source == "builtin:digits-mini"
    assert params.data.exclude_classes == ("BACKGROUND_Google",)
    assert (params.split.ratios.train, params.split.ratios.val, params.split.ratios.test) == (
        0.7,
        0.1,
        0.2,
    )
    assert params.model.backbone == "efficientnet_lite0"


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())


def test_dvc_stages_are_named_by_the_contract():
    assert list(_dvc_yaml()["stages"]) == STAGES
    assert list(__main__.STAGES) == STAGES
    for name, stage in _dvc_yaml()["stages"].items():
        assert stage["cmd"] == f"bin/stage {name}"


def test_every_param_dvc_yaml_names_exists():
    params = load_params(REPO_ROOT / "params.yaml")
    for name, stage in _dvc_yaml()["stages"].items():
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
    names = {f.name for f in dataclasses.fields(Params().paths)}
    import re

    for used in re.findall(r"\$\{paths\.(\w+)\}", text):
        assert used in names


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"splt": {}}, "unknown key 'splt' (did you mean 'split'?)"),
        ({"split": {"ratios": {"train": 0.7, "vall": 0.1}}}, "unknown key 'split.ratios.vall'"),
        ({"split": {"seed": "x"}}, "split.seed: expected int"),
        ({"split": {"seed": True}}, "split.seed: expected int"),
        ({"head": {"lr": "fast"}}, "head.lr: expected float or 'auto'"),
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
        parse_params(raw)
    assert message in str(info.value)


def test_values_are_typed():
    params = parse_params(
        {"head": {"lr": "1e-3"}, "download": {"timeout_s": 5}, "split": {"train_per_class": 30}}
    )
    assert params.head.lr == 0.001
    assert params.download.timeout_s == 5.0 and isinstance(params.download.timeout_s, float)
    assert params.split.train_per_class == 30
    assert parse_params({"head": {"lr": "auto"}}).head.lr == "auto"
    assert dataclasses.is_dataclass(params) and params.__dataclass_params__.frozen


def test_load_params_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("split:\n  sede: 1\n")
    with pytest.raises(
        ConfigError, match=r"params.yaml: unknown key 'split.sede' \(did you mean 'split.seed'\?\)"
    ):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
