"""Image datasets and loaders for the model stages, built on ``images.load_rgb``.

Evaluation inputs come from the backbone's :class:`Preprocessing`; training inputs add
torchvision.transforms.v2 augmentation and end in the same normalisation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import AugmentParams
from pipeline.data.images import ImageRefs, Source, load_rgb
from pipeline.data.preprocessing import Preprocessing
from pipeline.modeling.runtime import Runtime


def train_geometry(pre: Preprocessing, aug: AugmentParams) -> Callable[[Image.Image], np.ndarray]:
    """Training augmentation up to, not including, normalisation: HWC uint8 RGB out."""
    from torchvision.transforms import v2  # training only: evaluation never imports it (1 s)

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
        return np.array(geometric(img), dtype=np.uint8)  # a writable copy, for torch

    return transform


def train_transform(pre: Preprocessing, aug: AugmentParams) -> Callable[[Image.Image], np.ndarray]:
    """Training augmentation, then the backbone's normalisation: CHW float32 out."""
    geometry = train_geometry(pre, aug)

    def transform(img: Image.Image) -> np.ndarray:
        return pre.normalise(geometry(img))

    return transform


def eval_geometry(pre: Preprocessing) -> Callable[[Image.Image], np.ndarray]:
    """Evaluation resize/crop without normalisation: HWC uint8 RGB, for uint8-input engines."""

    def transform(img: Image.Image) -> np.ndarray:
        return np.array(pre.resize_crop(img), dtype=np.uint8)  # a writable copy, for torch

    return transform


def _interp(pre: Preprocessing):
    from torchvision.transforms import v2

    return v2.InterpolationMode(pre.interpolation)


def item_seed(seed: int, key: str, round_: int) -> int:
    """A seed per (image, epoch or view): an augmented image is the same wherever it is made."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{round_}".encode()).digest()[:8], "little")


class ImageDataset(Dataset):
    """(image, label) → (transformed image tensor, label, index), decoded in the loader's
    workers; an image is a file or its place in the raw store (``images.Source``).

    With ``augment_keys`` (one key per item, e.g. its sha256) the transform is random
    and seeded per (key, round): the item ``(i, round)`` asks for round ``round`` (an epoch
    or an augmented view), so results do not depend on workers, order or resumption.
    """

    def __init__(
        self,
        paths: Sequence[Source],
        labels: Sequence[int],
        transform: Callable[[Image.Image], np.ndarray],
        augment_keys: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        # ImageRefs stay arrays: a list of a million references would be copied to each worker
        self.paths = paths if isinstance(paths, ImageRefs) else list(paths)
        self.labels, self.transform = list(labels), transform
        self.augment_keys = None if augment_keys is None else list(augment_keys)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, round_ = item if isinstance(item, tuple) else (item, 0)
        img = load_rgb(self.paths[index])
        if self.augment_keys is None:
            arr = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.augment_keys[index], round_))
                arr = self.transform(img)
        return torch.from_numpy(arr), self.labels[index], index


class RoundSampler(Sampler):
    """Yields ``(index, round)``: a fresh order per round (epoch) seeded by (seed, round)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, round_: int = 0) -> None:
        self.size, self.seed, self.shuffle, self.round = size, seed, shuffle, round_

    def set_round(self, round_: int) -> None:
        self.round = round_

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.round)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        return ((i, self.round) for i in order)


def make_loader(
    dataset: Dataset,
    runtime: Runtime,
    batch_size: int,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """A loader that decodes in worker processes while the model computes."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=runtime.workers,
        pin_memory=runtime.cuda,
        persistent_workers=persistent and runtime.workers > 0,
        prefetch_factor=4 if runtime.workers else None,
    )
