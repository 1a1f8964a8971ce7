"""Embeddings on disk: the per-image cache by content, and the features stage's arrays.

``FeatureCache`` keeps embeddings by image sha256 under one key in the memo (append-only
shards), so a rerun computes only new images. ``RowArrays`` writes the features stage's
arrays as memory-mapped files, so the stage's memory does not grow with the dataset;
``load_features`` and ``labelled`` map them for the stages that train and score on them.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Paths
from pipeline.data.splits import read_split
from pipeline.errors import DataError
from pipeline.system import memo
from pipeline.system.diskfull import free_bytes

SHARD_ROWS = 32_768  # embeddings per cache shard: 160 MB at 1,280 float32 dimensions


class FeatureCache:
    """Embeddings by image sha256 under one key, as append-only shards of .npz files: an
    entry of the memo's ``kind`` (``features``, or ``reference`` for onnx_check's)."""

    shard_rows = SHARD_ROWS

    def __init__(self, root: Path, key: str, kind: memo.Kind = memo.FEATURES) -> None:
        self.store, self.key = memo.Store(root, kind), key

    @property
    def folder(self) -> Path:
        return self.store.path(self.key)

    def load(self) -> dict[str, np.ndarray]:
        """The kept embeddings by sha256 (a damaged shard is warned about and dropped)."""
        found: dict[str, np.ndarray] = {}
        for shas, features in self.shards():
            found.update(zip(shas, features, strict=True))
        return found

    def shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """The kept (sha256s, embeddings) one shard at a time, oldest first."""
        return self.store.each_shard(self.key, read_shard)

    def add(self, shas: list[str], features: np.ndarray) -> None:
        """Keep ``features`` (one row per sha256), in shards of at most ``shard_rows`` rows:
        reading the cache back never needs more than a shard in memory."""
        for start in range(0, len(shas), self.shard_rows):
            part = shas[start : start + self.shard_rows]
            rows = np.asarray(features[start : start + self.shard_rows], dtype=np.float32)

            def write(tmp: Path, part=part, rows=rows) -> None:
                with open(tmp, "wb") as fh:
                    np.savez(fh, sha256=np.asarray(part), features=rows)

            self.store.add_shard(self.key, sorted(part), write)


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


def allocated_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A new float32 ``.npy`` file at ``path``, memory-mapped for writing, its blocks
    reserved first: a full disk is an ENOSPC here, never a SIGBUS on a later write into
    the mapping."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return array


class RowArrays:
    """Arrays that read as one: row ``r`` of the whole is a row of the array it falls in
    (the features stage's splits, each its own file, in split-CSV order)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _parts(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for i, array in enumerate(self.arrays):
            here = np.flatnonzero(which == i)
            if here.size:
                yield array, here, rows[here] - self.starts[i]

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        for array, here, local in self._parts(np.asarray(rows)):
            array[local] = values[here]

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = np.empty((len(rows), *self.arrays[0].shape[1:]), dtype=np.float32)
        for array, here, local in self._parts(rows):
            out[here] = array[local]
        return out


def load_features(paths: Paths) -> tuple[dict[str, np.ndarray], dict]:
    """The features stage's arrays by split (plus ``train_aug`` when present), memory-mapped
    read-only, and its index."""
    folder = paths.features
    if not (folder / "index.json").exists():
        raise DataError(f"{folder}/index.json does not exist: run the features stage first")
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    arrays = {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy")}
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
