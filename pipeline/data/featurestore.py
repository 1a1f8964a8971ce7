"""Embeddings on disk: the per-image cache by content, and the features stage's arrays.

``FeatureCache`` keeps embeddings by image sha256 under one cache key (append-only
shards), so a rerun computes only new images. ``load_features`` and ``labelled`` read the
arrays the features stage wrote, for the stages that train and score on them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Paths
from pipeline.data.splits import read_split
from pipeline.errors import DataError
from pipeline.system.diskfull import disk_full_is_an_error, free_bytes
from pipeline.system.fsutil import atomic_path


class FeatureCache:
    """Embeddings by image sha256 for one cache key, as append-only shards of .npz files."""

    def __init__(self, root: Path, key: str) -> None:
        self.folder = root / key

    def load(self) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard) as data:
                found.update(zip(data["sha256"].tolist(), data["features"], strict=True))
        return found

    def add(self, shas: list[str], features: np.ndarray) -> None:
        if not shas:
            return
        name = hashlib.sha256("".join(sorted(shas)).encode()).hexdigest()[:16]
        shard = self.folder / f"shard-{time.time_ns()}-{name}.npz"
        with disk_full_is_an_error(shard, "paths.feature_cache"):
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(shard) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, sha256=np.asarray(shas), features=features.astype(np.float32))


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save``, with a full disk reported as ENOSPC.

    numpy writes arrays with C ``fwrite`` and reports a short write as a bare OSError
    ("N requested and M written") without errno; with no room left for the array on the
    disk, that is a full disk.
    """
    try:
        np.save(path, array, allow_pickle=False)
    except OSError as exc:
        if exc.errno is None and free_bytes(path) < array.nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
        raise


def load_features(paths: Paths) -> tuple[dict[str, np.ndarray], dict]:
    """The features stage's arrays by split (plus ``train_aug`` when present) and its index."""
    folder = paths.features
    if not (folder / "index.json").exists():
        raise DataError(f"{folder}/index.json does not exist: run the features stage first")
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    arrays = {p.stem: np.load(p) for p in folder.glob("*.npy")}
    return arrays, index


@dataclass(frozen=True)
class Labelled:
    """Features and integer labels of one split."""

    x: np.ndarray
    y: np.ndarray


def labelled(
    paths: Paths, arrays: dict[str, np.ndarray], classes: list[str], split: str
) -> Labelled:
    lookup = {c: i for i, c in enumerate(classes)}
    labels = read_split(paths, split)["label"]
    unknown = sorted(set(labels) - set(lookup))
    if unknown:
        raise DataError(f"{split} split has classes not in train: {unknown}")
    return Labelled(arrays[split], labels.map(lookup).to_numpy(dtype=np.int64))
