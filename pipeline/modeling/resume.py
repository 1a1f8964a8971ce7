"""Resuming fine-tuning exactly where a killed run stopped.

A checkpoint holds the weights, optimiser, schedule, the run's :class:`TrainState` and,
when written inside an epoch, the epoch's :class:`EpochProgress` and every RNG state. Each
epoch seeds its own shuffling, augmentation and dropout, and a resumed epoch skips the
batches already done (:class:`ResumableSampler`) with the RNGs as they were, so a resumed
run follows the same path as an uninterrupted one. A checkpoint is resumed only when its
:func:`fingerprint` (inputs, params, precision) is the run's. Every function here takes
its files and values as arguments: the stage resolves them once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.config import FinetuneParams, ModelParams
from pipeline.errors import DataError
from pipeline.modeling.datasets import RoundSampler, make_loader
from pipeline.modeling.runtime import Runtime
from pipeline.system.fsutil import (
    load_torch_weights,
    remove_stale_temporaries,
    save_torch_atomic,
    sha256_file,
)

log = logging.getLogger(__name__)


def fingerprint(
    head: Path, splits: Sequence[str], model_cfg: ModelParams, cfg: FinetuneParams, bf16: bool
) -> str:
    """What a checkpoint must match to be resumed: inputs, params and precision.

    Args:
        head: the trained head's checkpoint.
        splits: the train and val split tables' digests (``splits.rows_digest``).

    ``checkpoint_every_steps`` is left out: it says when to save, not what is computed.
    """
    settings = asdict(cfg)
    del settings["checkpoint_every_steps"]
    parts = {
        "head": sha256_file(head),
        "model": asdict(model_cfg),
        "finetune": settings,
        "bf16": bf16,
        "splits": list(splits),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class TrainState:
    """Everything a resumed run needs at an epoch boundary; saved in every checkpoint."""

    epoch: int = 0
    best_acc: float = -math.inf  # all epochs, epoch 0 (head alone) too: picks weights
    best_loss: float = math.inf  # of the epoch with best_acc: breaks ties
    best_trained_loss: float = math.inf  # fine-tuned epochs only: early stopping
    best_state: dict | None = None
    waited: int = 0
    history: list = field(default_factory=list)


@dataclass
class EpochProgress:
    """How far into epoch ``epoch`` training is: batches done and their running sums.

    A checkpoint written inside an epoch stores it, so the resumed epoch skips exactly
    those batches and its history row comes out as if it had never stopped.
    """

    epoch: int
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


class ResumableSampler(RoundSampler):
    """A :class:`RoundSampler` that can start a round after its first ``skip`` items.

    The skipped items are never handed to the loader, so their images are not decoded.
    """

    skip: int = 0

    def __len__(self) -> int:
        return self.size - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return itertools.islice(super().__iter__(), self.skip, None)


def resumable_loader(dataset: Dataset, runtime: Runtime, batch_size: int, seed: int) -> DataLoader:
    """The training loader: shuffled per epoch by a :class:`ResumableSampler` (its
    ``sampler``), the last partial batch dropped, workers kept between epochs."""
    sampler = ResumableSampler(len(dataset), seed)
    return make_loader(
        dataset, runtime, batch_size, sampler=sampler, drop_last=True, persistent=True
    )


def rng_states(cuda: bool) -> dict:
    """Every RNG a training step may draw from (dropout, stochastic depth, any transform)."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda else [],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": random.getstate(),
    }


def restore_rng_states(states: dict, cuda: bool) -> None:
    torch.set_rng_state(states["torch"])
    if cuda and states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def save_training_checkpoint(path: Path, payload: dict) -> None:
    """One file per checkpoint: written to a temporary sibling, fsynced, renamed onto ``path``.

    A kill at any moment leaves either the previous checkpoint or this one, never a torn file.
    """
    save_torch_atomic(path, payload)


def read_training_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` if it was written for these inputs and params, else None.

    Temporaries of saves that were killed are deleted, never read; an unreadable file
    (or one that is not weights-only) is reported and training starts over.
    """
    remove_stale_temporaries(path)
    if not path.exists():
        return None
    try:
        saved = load_torch_weights(path)
    except DataError as exc:
        log.warning("starting finetune over: %s", exc)
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != key:
        log.info("ignoring %s: it was written for other inputs or params", path)
        return None
    return saved


def save_resume_point(
    path: Path,
    key: str,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    progress: EpochProgress | None,
    cuda: bool,
) -> None:
    """Everything a killed run needs to resume exactly: weights, optimiser, schedule, the
    epoch's position (None at an epoch's end) and every RNG; ``key`` is the fingerprint."""
    save_training_checkpoint(
        path,
        {
            "fingerprint": key,
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": None,  # bf16 autocast needs no loss scaling; kept for fp16
            "state": asdict(state),
            "progress": None if progress is None else asdict(progress),
            "rng": rng_states(cuda),
        },
    )


def resume_from(
    path: Path,
    key: str,
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps: int,
) -> tuple[TrainState, EpochProgress | None, dict | None] | None:
    """Load the checkpoint at ``path`` into the run if its fingerprint is ``key``: weights,
    optimiser and schedule. Returns its state and, when it was written inside an epoch (of
    ``steps`` batches), that epoch's progress and RNG states; None when there is none."""
    saved = read_training_checkpoint(path, key)
    if saved is None:
        return None
    model.load_state_dict(saved["model"])
    optimiser.load_state_dict(saved["optimiser"])
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainState(**saved["state"])
    if saved["progress"] is None:
        log.info("resuming finetune from the checkpoint after epoch %d", state.epoch)
        return state, None, None
    progress = EpochProgress(**saved["progress"])
    log.info(
        "resuming finetune from the checkpoint at epoch %d, step %d of %d",
        progress.epoch,
        progress.step,
        steps,
    )
    return state, progress, saved["rng"]


def start_epoch(
    loader: DataLoader,
    epoch: int,
    progress: EpochProgress | None,
    rng: dict | None,
    seed: int,
    cuda: bool,
) -> tuple[Iterator, EpochProgress]:
    """The batches of epoch ``epoch`` from a :func:`resumable_loader`, and its progress.

    When ``progress`` is that epoch's, the batches start where it stopped and the RNGs are
    restored from ``rng``; otherwise the epoch starts over with its own seeds.
    """
    resumed = progress is not None and progress.epoch == epoch
    progress = progress if resumed else EpochProgress(epoch)
    loader.sampler.set_round(epoch)  # shuffling and augmentation are seeded per epoch
    loader.sampler.skip = progress.step * loader.batch_size
    # A new loader iterator draws a seed from the global RNG, so the RNGs are set after it.
    batches = iter(loader)
    if resumed:
        restore_rng_states(rng, cuda)
    else:
        torch.manual_seed(seed + epoch)  # dropout
    return batches, progress


def run_epoch(
    batches: Iterable,
    progress: EpochProgress,
    steps: int,
    every: int,
    step: Callable[[torch.Tensor, torch.Tensor, int], tuple[float, int]],
    save: Callable[[EpochProgress], None],
    desc: str,
) -> dict:
    """The rest of an epoch of ``steps`` batches, from ``progress.step``, counted and timed.

    ``step(images, labels, n)`` trains on batch ``n`` and returns its mean loss and the
    number it got right. Every ``every`` batches (0: never) but the last, ``save(progress)``
    writes a checkpoint. Returns the epoch's loss, accuracy, images and seconds.
    """
    started = time.perf_counter() - progress.seconds
    with tqdm(total=steps, initial=progress.step, unit="batch", desc=desc, disable=None) as bar:
        for images, y, _index in batches:
            loss, correct = step(images, y, progress.step + 1)
            progress.step += 1
            progress.loss_sum += loss * len(y)
            progress.correct += correct
            progress.seen += len(y)
            bar.update(1)
            if every and progress.step % every == 0 and progress.step < steps:
                progress.seconds = time.perf_counter() - started
                save(progress)
    return {
        "train_loss": progress.loss_sum / progress.seen,
        "train_acc": progress.correct / progress.seen,
        "images": progress.seen,
        "seconds": time.perf_counter() - started,
    }
