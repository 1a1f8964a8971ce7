"""Embeddings on disk: the per-image cache by content, and the features stage's arrays.

``FeatureCache`` keeps embeddings by image sha256 under one key in the memo (append-only
shards), so a rerun computes only new images. ``load_features`` and ``labelled`` read the
arrays the features stage wrote, for the stages that train and score on them.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Paths
from pipeline.data.splits import read_split
from pipeline.errors import DataError
from pipeline.system import memo
from pipeline.system.diskfull import free_bytes


class FeatureCache:
    """Embeddings by image sha256 under one key, as append-only shards of .npz files: an
    entry of the memo's ``kind`` (``features``, or ``reference`` for onnx_check's)."""

    def __init__(self, root: Path, key: str, kind: memo.Kind = memo.FEATURES) -> None:
        self.store, self.key = memo.Store(root, kind), key

    @property
    def folder(self) -> Path:
        return self.store.path(self.key)

    def load(self) -> dict[str, np.ndarray]:
        """The kept embeddings by sha256 (a damaged shard is warned about and dropped)."""
        found: dict[str, np.ndarray] = {}
        for shas, features in self.store.shards(self.key, read_shard):
            found.update(zip(shas, features, strict=True))
        return found

    def add(self, shas: list[str], features: np.ndarray) -> None:
        if not shas:
            return

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, sha256=np.asarray(shas), features=features.astype(np.float32))

        self.store.add_shard(self.key, sorted(shas), write)


def read_shard(shard: Path) -> tuple[list[str], np.ndarray]:
    """A shard's sha256s and embeddings; numpy refuses pickled objects (allow_pickle=False)."""
    with np.load(shard) as data:
        shas, features = data["sha256"].tolist(), data["features"]
    if len(shas) != len(features):
        raise ValueError(f"{len(shas)} sha256s for {len(features)} embeddings")
    return shas, features


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
