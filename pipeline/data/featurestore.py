"""Embeddings on disk: the per-image cache by content, and the features stage's arrays.

``FeatureCache`` keeps embeddings by image sha256 under one key in the memo (append-only
shards), so a rerun computes only new images. ``NpyRows`` writes the features stage's
arrays row by row in place, so the stage's memory does not grow with the dataset;
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


def reserve(fd: int, size: int) -> None:
    """The file's blocks, up to ``size`` bytes, taken now where the system can
    (``posix_fallocate``); elsewhere (macOS, a filesystem that refuses it) its size only."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    os.ftruncate(fd, size)


class NpyRows:
    """Rows of a float32 ``.npy`` file, written and read in place (``pwrite``/``pread``),
    not through a mapping: a mapped file's written pages count as the process's memory
    until the kernel writes them back, so filling a 5 GB array through one would take 5 GB
    of RSS. ``create`` makes the file; ``view(v)`` addresses ``[:, v]`` of a 3-d one."""

    def __init__(self, name: str, fd: int, shape: tuple[int, ...], base: int, stride: int) -> None:
        self.name, self.fd, self.shape, self.base, self.stride = name, fd, shape, base, stride
        self.row_shape = shape[1:]

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...]) -> NpyRows:
        """A new file of ``shape``, its blocks reserved first: a full disk is an ENOSPC
        here, not a failure halfway."""
        shape = tuple(int(n) for n in shape)  # the header holds their repr
        with open(path, "wb") as fh:
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(fh, header)
            base = fh.tell()
        stride = int(np.prod(shape[1:], dtype=np.int64)) * 4
        fd = os.open(path, os.O_RDWR)
        try:
            reserve(fd, base + shape[0] * stride)
        except OSError:
            os.close(fd)
            raise
        return cls(str(path), fd, shape, base, stride)

    def view(self, v: int) -> NpyRows:
        shape = (self.shape[0], *self.shape[2:])
        base = self.base + v * self.stride // self.shape[1]
        return NpyRows(self.name, self.fd, shape, base, self.stride)

    def __len__(self) -> int:
        return self.shape[0]

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype="<f4")
        if values.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {values.shape[1:]} for {self.name}'s {self.row_shape}")
        for row, value in zip(rows.tolist(), values, strict=True):
            if os.pwrite(self.fd, value.data, self.base + row * self.stride) != value.nbytes:
                raise OSError(errno.EIO, f"short write into {self.name}")

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), dtype="<f4")
        size = out[0].nbytes if len(rows) else 0
        for i, row in enumerate(rows.tolist()):
            out[i] = np.frombuffer(
                os.pread(self.fd, size, self.base + row * self.stride), "<f4"
            ).reshape(self.row_shape)
        return out

    def close(self) -> None:
        os.close(self.fd)


class RowArrays:
    """Row files that read as one: row ``r`` of the whole is a row of the file it falls in
    (the features stage's splits, each its own file, in split-CSV order)."""

    def __init__(self, files: list[NpyRows]) -> None:
        self.files = files
        self.starts = np.cumsum([0] + [len(f) for f in files])

    def _parts(self, rows: np.ndarray) -> Iterator[tuple[NpyRows, np.ndarray, np.ndarray]]:
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for i, file in enumerate(self.files):
            here = np.flatnonzero(which == i)
            if here.size:
                yield file, here, rows[here] - self.starts[i]

    def put(self, rows: np.ndarray, values: np.ndarray) -> None:
        for file, here, local in self._parts(np.asarray(rows)):
            file.put(local, values[here])

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = np.empty((len(rows), *self.files[0].row_shape), dtype=np.float32)
        for file, here, local in self._parts(rows):
            out[here] = file.take(local)
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
