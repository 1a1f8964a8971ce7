"""int8 calibration in two parts, the backbone's kept (issue #19), on a small convolutional
classifier joined as export joins it: the ranges and the int8 file are a fresh
calibration's, byte for byte, whether the backbone's part was kept or taken now."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pipeline.data.preprocessing import Preprocessing
from pipeline.modeling import engines, graphs, quantization
from pipeline.modeling.quantization import CalibrationImages
from pipeline.system import memo
from tests.support.exports import counted_calls
from tests.support.images import colour_images

SPLIT_AT = "features"


def backbone(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return module.eval()


def head(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def joined_file(path: Path, back: nn.Module, top: nn.Module, cache: Path) -> Path:
    """The classifier as export writes it: the two parts' kept graphs, joined at SPLIT_AT."""
    first = engines.kept_graph(back, torch.zeros(2, 3, 32, 32), ("input", SPLIT_AT), 18, cache)
    second = engines.kept_graph(top, torch.zeros(2, 16), (SPLIT_AT, "logits"), 18, cache)
    onnx.save_model(graphs.joined(first, second, SPLIT_AT, ("backbone/", "head/")), str(path))
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> CalibrationImages:
    root = colour_images(tmp_path_factory.mktemp("images"), per_class=7)
    files = sorted(str(p) for p in root.rglob("*.png"))  # 21: a short last batch of 5
    pre = Preprocessing(32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), resize="squash")
    return CalibrationImages(files, [f"sha-{i}" for i in range(len(files))], pre, "input", 8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """``first``; ``new_head``: the same backbone under another head; ``moved``: the first
    head on a changed backbone."""
    folder = tmp_path_factory.mktemp("models")
    graphs = folder / "graphs"
    return {
        "first": joined_file(folder / "first.onnx", backbone(0), head(0), graphs),
        "new_head": joined_file(folder / "new_head.onnx", backbone(0), head(1), graphs),
        "moved": joined_file(folder / "moved.onnx", backbone(2), head(0), graphs),
    }


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_ranges_taken_in_two_parts_are_the_whole_graphs(models, calibration, method, tmp_path):
    prepared = tmp_path / "prepared.onnx"
    quantization.prepare(models["first"], prepared)
    whole = quantization.calibrate(prepared, calibration.batches(), method)
    parts = quantization.calibration_ranges(
        prepared, calibration, method, SPLIT_AT, tmp_path / "cache"
    )
    assert parts.calibration_method == whole.calibration_method
    assert SPLIT_AT in whole.data and len(whole.data) > 5
    assert set(parts.data) == set(whole.data)
    for name, expected in whole.data.items():
        got = parts.data[name]
        assert got._attrs == expected._attrs, name
        for attribute in expected._attrs:
            np.testing.assert_array_equal(
                getattr(got, attribute), getattr(expected, attribute), err_msg=name
            )


def test_a_new_head_reuses_the_backbones_calibration_and_quantizes_as_afresh(
    models, calibration, tmp_path, monkeypatch
):
    calibrated = counted_calls(monkeypatch, quantization, "backbone_calibration")
    cache = tmp_path / "cache"

    def int8(name: str, folder: Path = cache, images=calibration) -> bytes:
        proto = quantization.quantize_int8(models[name], images, "minmax", SPLIT_AT, folder)
        return proto.SerializeToString()

    int8("first")
    assert len(calibrated) == 1
    kept_head = int8("new_head")
    assert len(calibrated) == 1  # the backbone's ranges were kept
    assert kept_head == int8("new_head", tmp_path / "empty")  # = calibrated afresh
    assert len(calibrated) == 2

    int8("moved")  # another backbone: its own calibration
    assert len(calibrated) == 3
    fewer = CalibrationImages(
        calibration.image_paths[:-1], calibration.digests[:-1], calibration.pre, "input", 8
    )
    int8("first", images=fewer)  # other images: calibrated again
    assert len(calibrated) == 4

    kept = sorted((cache / memo.CALIBRATIONS.folder).iterdir())
    assert len(kept) == 3  # first (= new_head's), moved, fewer
    for folder in kept:
        (folder / "ranges.json").write_text("{")  # damaged: calibrated again, same result
    assert int8("new_head") == kept_head
    assert len(calibrated) == 5
