"""Shared fixtures: tiny generated image folders and a workspace to run stages in."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Params, parse_params

REPO_ROOT = Path(__file__).resolve().parents[1]
CALTECH = REPO_ROOT.parent / "shared" / "datasets" / "101_ObjectCategories.tar.gz"
CALTECH_SHA256 = "842897447c5f67bcf307ace446d36dbef01baa40309bd9885cf20b3b394cabd6"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def noise_image(seed: int, size: tuple[int, int] = (32, 24), mode: str = "RGB") -> Image.Image:
    """A random image; different seeds give different perceptual hashes."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def create_image_folder(
    root: Path, classes: dict[str, int], seed: int = 0, suffix: str = ".png"
) -> Path:
    """``root/<class>/img_NN<suffix>`` with ``classes[name]`` distinct images each."""
    for c, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            noise_image(seed * 100_000 + c * 1000 + i).save(folder / f"img_{i:02d}{suffix}")
    return root


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """Three classes of ten small distinct images, in ``tmp_path/images``."""
    return create_image_folder(tmp_path / "images", {"cat": 10, "dog": 10, "bird": 10})


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run stages inside ``tmp_path/ws`` (params use relative paths, like the repo)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)

    def make_params(**sections) -> Params:
        return parse_params(sections)

    return make_params


def caltech_or_skip() -> Path:
    if not CALTECH.exists():
        pytest.skip(
            f"Caltech-101 archive not found at {CALTECH} (see ../shared/datasets/README.md)"
        )
    return CALTECH
