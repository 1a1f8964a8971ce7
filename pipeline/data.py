"""Image datasets and loaders for the model stages, built on ``images.load_rgb``.

Evaluation inputs come from the backbone's :class:`Preprocessing`; training inputs add
torchvision.transforms.v2 augmentation and end in the same normalisation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.config import AugmentParams
from pipeline.images import load_rgb
from pipeline.preprocessing import Preprocessing
from pipeline.runtime import Runtime


def train_transform(pre: Preprocessing, aug: AugmentParams) -> Callable[[Image.Image], np.ndarray]:
    steps = [
        v2.RandomResizedCrop(
            pre.input_size, scale=(aug.scale_min, 1.0), interpolation=_interp(pre), antialias=True
        )
    ]
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.jitter > 0:
        steps.append(v2.ColorJitter(aug.jitter, aug.jitter, aug.jitter))
    geometric = v2.Compose(steps)

    def transform(img: Image.Image) -> np.ndarray:
        return pre.normalise(np.asarray(geometric(img), dtype=np.uint8))

    return transform


def _interp(pre: Preprocessing) -> v2.InterpolationMode:
    return v2.InterpolationMode(pre.interpolation)


def item_seed(seed: int, sha256: str, view: int) -> int:
    """A seed per (image, view): an augmented view is the same wherever it is computed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sha256}:{view}".encode()).digest()[:8], "little")


class ImageDataset(Dataset):
    """(path, label) → (CHW float32 tensor, label, index), decoded in the loader's workers."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Callable[[Image.Image], np.ndarray],
        seeds: Sequence[int] | None = None,
    ) -> None:
        self.paths, self.labels, self.transform, self.seeds = (
            list(paths),
            list(labels),
            transform,
            seeds,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        img = load_rgb(self.paths[index])
        if self.seeds is None:
            arr = self.transform(img)
        else:  # deterministic augmentation
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seeds[index])
                arr = self.transform(img)
        return torch.from_numpy(arr), self.labels[index], index


def make_loader(
    dataset: Dataset,
    runtime: Runtime,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A loader that decodes in worker processes while the model computes."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=runtime.workers,
        pin_memory=runtime.cuda,
        persistent_workers=False,
        prefetch_factor=4 if runtime.workers else None,
        generator=generator,
    )
