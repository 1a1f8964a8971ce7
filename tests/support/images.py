"""Generated images: noise that hashes apart, folders of classes, and colours ImageNet
features separate easily."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


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


def colour_images(
    root: Path, per_class: int = 30, start: int = 0, classes: tuple[str, ...] = tuple(COLOURS)
) -> Path:
    """Noisy images dominated by one colour per class: easy for ImageNet features. ``start``
    > 0 adds images ``img_<start>``... to ``classes``, distinct from the first ones."""
    rng = np.random.default_rng(start)
    for name in classes:
        rgb = COLOURS[name]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=start > 0)
        for i in range(start, start + per_class):
            noise = rng.integers(-50, 50, size=(24, 32, 3))
            arr = np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(folder / f"img_{i:02d}.png")
    return root
