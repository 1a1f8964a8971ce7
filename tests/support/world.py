"""One way to build a tiny workspace: generated images, params from params.yaml with small
settings laid over them, and the stages run in-process up to a given one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.config import Params
from pipeline.stages import download, split, validate
from tests.support.images import colour_images, create_image_folder
from tests.support.project import merged, params_with, write_params

# Fast settings for stages that only need to run, not to learn: random weights, CPU,
# one short fine-tuning epoch.
TINY = {
    "model": {"weights": "none"},
    "device": "cpu",
    "head": {"epochs": 30, "patience": 30},
    "finetune": {"epochs": 1, "batch_size": 8},
    "export": {"calibration_images": 4},  # one small calibration batch (tests needing more say so)
}


@dataclass
class TinyWorld:
    """A workspace folder (the working directory) and the overrides its params were made with."""

    root: Path
    images: Path
    overrides: dict = field(default_factory=dict)

    def __call__(self, **sections) -> Params:
        """Params of this workspace, with ``sections`` laid over its own overrides."""
        return params_with(**merged(self.overrides, sections))

    def run(self, *stages, **sections) -> dict:
        """Run the stage modules ``stages`` in order with ``self(**sections)``; the last
        one's result."""
        params, result = self(**sections), {}
        for stage in stages:
            result = stage.main(params)
        return result

    def write_params_file(self, **sections) -> Path:
        """``params.yaml`` in the workspace, holding what ``self(**sections)`` returns: for a
        stage run as ``python -m pipeline``."""
        return write_params(self.root / "params.yaml", **merged(self.overrides, sections))

    @classmethod
    def build(
        cls,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        images_per_class: int = 10,
        classes: tuple[str, ...] = ("cat", "dog", "bird"),
        images: Path | None = None,
        **overrides,
    ) -> TinyWorld:
        """Images (noise, or ``images``), a workspace ``tmp_path/ws`` made the working
        directory, and download, validate and split run on them with ``TINY`` plus
        ``overrides``."""
        if images is None:
            images = create_image_folder(
                tmp_path / "images", dict.fromkeys(classes, images_per_class)
            )
        ws = tmp_path / "ws"
        ws.mkdir(exist_ok=True)
        monkeypatch.chdir(ws)
        world = cls(ws, images, merged(TINY, {"data": {"source": str(images)}, **overrides}))
        params = world()
        for stage in (download, validate, split):
            stage.main(params)
        return world

    @classmethod
    def for_promotion(cls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TinyWorld:
        """Colour images split into train/val/test, a folder registry, no int8 file: what
        the promote tests export their colour models into."""
        return cls.build(
            tmp_path,
            monkeypatch,
            images=colour_images(tmp_path / "images"),
            export={"quantize": False},
            promote={"registry": str(tmp_path / "registry")},
        )
