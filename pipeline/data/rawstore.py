"""The raw store: the images download accepted, as content-addressed tar shards and an index.

DVC hashes, caches and pushes each file it tracks, so a million images kept as a million
files make every check and push linear in files (treeverse/dvc#7607). The store packs them
into shards of about ``SHARD_BYTES``, each named by its own sha256 and never rewritten:
DVC tracks hundreds of files, and a run after the data grew adds, and pushes, only new
shards. ``paths.raw`` holds

- ``shards/<sha256>.tar``: uncompressed tar in the WebDataset layout, one member per
  distinct image, named ``<image sha256><suffix>``; the same input gives the same bytes
  (fixed member metadata), so two machines that download the same data share the shards;
- ``index.parquet``: one row per image file: ``path`` (``<class>/<file>``), ``label``,
  ``sha256``, ``shard``, ``offset`` and ``size`` of its bytes in the shard.

Stages name an image by its logical path ``<paths.raw>/<class>/<file>`` (the manifest and
the split tables keep it) and read its bytes through :meth:`RawStore.locate`, which gives
an :class:`ImageRef`: random access by offset, no extraction.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.images import ImageRef
from pipeline.errors import DataError
from pipeline.system.fsutil import remove, sha256_file

if TYPE_CHECKING:
    import pandas as pd

INDEX = "index.parquet"
SHARDS = "shards"
INDEX_COLUMNS = ["path", "label", "sha256", "shard", "offset", "size"]
# A shard closes once it holds this many bytes. At realistic JPEG sizes (~100 kB) a million
# images make ~1,500 shards; at 2 kB thumbnails, ~30.
SHARD_BYTES = 64 << 20
# A kept shard whose live images fill less than this share of it is not kept: its live
# images are written again into the new shards, so deleted images do not pin space forever.
KEEP_LIVE_SHARE = 0.5
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")
_TAR_END = 2 * tarfile.BLOCKSIZE


@dataclass(frozen=True)
class RawStore:
    """The store at ``root``, its index read once."""

    root: Path
    index: pd.DataFrame
    _keys: list = field(default_factory=list, compare=False, repr=False)  # built once

    @classmethod
    def open_if_there(cls, root: Path) -> RawStore | None:
        """The store, or None where download has not written one."""
        return cls.open(root) if (Path(root) / INDEX).is_file() else None

    @classmethod
    def open(cls, root: Path) -> RawStore:
        import pandas as pd  # here: finetune on a head experiment reads no image, nor pandas

        path = Path(root) / INDEX
        if not path.is_file():
            raise DataError(f"{path} does not exist: run the download stage first")
        index = pd.read_parquet(path)
        if list(index.columns) != INDEX_COLUMNS:
            raise DataError(f"{path}: columns {list(index.columns)}, expected {INDEX_COLUMNS}")
        return cls(Path(root), index)

    def logical(self, key: str) -> str:
        """The path stages and tables name the image ``<class>/<file>`` by."""
        return f"{self.root.as_posix()}/{key}"

    def files(self) -> list[tuple[str, str]]:
        """(logical path, label) for every image file, sorted by path."""
        return [
            (self.logical(k), label)
            for k, label in zip(self.index["path"], self.index["label"], strict=True)
        ]

    def shard_path(self, shard: str) -> Path:
        return self.root / SHARDS / shard

    def locate(self, paths: Iterable[str]) -> list[ImageRef]:
        """The :class:`ImageRef` of each logical path; an unknown path is a one-line error."""
        import pandas as pd

        wanted = pd.Index([str(p) for p in paths])
        if not self._keys:
            self._keys.append(pd.Index(self.root.as_posix() + "/" + self.index["path"]))
        found = self._keys[0].get_indexer(wanted)
        if (found < 0).any():
            missing = wanted[found < 0]
            raise DataError(
                f"{missing[0]} is not in the raw store {self.root / INDEX} ({len(missing)} "
                "missing): rerun download, then the stages after it"
            )
        shard = self.index["shard"].to_numpy()[found]
        offset = self.index["offset"].to_numpy()[found]
        size = self.index["size"].to_numpy()[found]
        folder = (self.root / SHARDS).as_posix()
        files = {s: f"{folder}/{s}" for s in set(shard)}  # one string per shard, shared
        return [
            ImageRef(files[s], int(o), int(n), name)
            for s, o, n, name in zip(shard, offset, size, wanted, strict=True)
        ]

    def read_bytes(self, key: str) -> bytes:
        """The bytes of the image ``<class>/<file>``."""
        return self.locate([self.logical(key)])[0].read()


@dataclass
class ShardWriter:
    """Writes new images into shards of about ``SHARD_BYTES`` under ``folder``; each shard
    is renamed to its own sha256 once closed."""

    folder: Path
    limit: int = SHARD_BYTES
    written: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # sha → place
    shards: list[str] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _open: list[str] = field(default_factory=list)  # the open shard's image sha256s
    _tmp: Path | None = None

    def add(self, sha256: str, suffix: str, data: bytes) -> None:
        if self._tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._tmp = self.folder / f".shard-{len(self.shards)}.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        info = tarfile.TarInfo(sha256 + (suffix if _SUFFIX.fullmatch(suffix) else ""))
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self._tar.addfile(info, io.BytesIO(data))
        offset = self._tar.offset - (_footprint(len(data)) - tarfile.BLOCKSIZE)  # data's start
        self.written[sha256] = ("", offset, len(data))
        self._open.append(sha256)
        if self._tar.offset >= self.limit:
            self.close()

    def close(self) -> None:
        """Close the open shard, if any, and name it by its content."""
        if self._tar is None:
            return
        end = self._tar.offset
        self._tar.close()
        assert self._tmp is not None
        # the end-of-archive blocks, without tarfile's padding to a 10 kB record: a shard's
        # size is then its members' and a live share is exact (readers need no padding)
        os.truncate(self._tmp, end + _TAR_END)
        name = f"{sha256_file(self._tmp)}.tar"
        os.replace(self._tmp, self.folder / name)
        for sha in self._open:
            _, offset, size = self.written[sha]
            self.written[sha] = (name, offset, size)
        self.shards.append(name)
        self._tar, self._tmp, self._open = None, None, []

    def abandon(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            remove(self._tmp)


@dataclass(frozen=True)
class Written:
    """What :func:`write_store` did, for download's metrics."""

    files: int
    reused: int  # files whose bytes a kept shard already held
    shards: int
    new_shards: int
    new_bytes: int
    bytes: int


def write_store(
    files: Iterable[tuple[str, str, Path]],
    target: Path,
    previous: RawStore | None = None,
    limit: int = SHARD_BYTES,
) -> Written:
    """Write the store for ``files`` ((key ``<class>/<file>``, label, source file), in
    order) into the empty folder ``target``, reading each source file once.

    Images that a shard of ``previous`` holds are not written again: the shard is
    hard-linked (or copied) in, unless its live images now fill less than
    ``KEEP_LIVE_SHARE`` of it; then they go into the new shards with the new images."""
    import pandas as pd

    rows: list[tuple[str, str, str]] = []
    known = _places(previous) if previous is not None else {}
    writer = ShardWriter(target / SHARDS, limit)
    try:
        for key, label, source in files:
            data = source.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha not in known and sha not in writer.written:
                writer.add(sha, source.suffix.lower(), data)
            rows.append((key, label, sha))
        live = dict.fromkeys(sha for _, _, sha in rows if sha in known)
        kept = _worth_keeping(previous, [known[sha] for sha in live]) if live else set()
        for sha in live:  # the live images of shards not kept: written again, in order
            shard, offset, size = known[sha]
            if shard not in kept:
                ref = ImageRef(str(previous.shard_path(shard)), offset, size, sha)
                writer.add(sha, _suffix_in(previous, shard, offset), ref.read())
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    (target / SHARDS).mkdir(parents=True, exist_ok=True)
    for shard in sorted(kept):
        _link_or_copy(previous.shard_path(shard), target / SHARDS / shard)
    places = {sha: known[sha] for sha in live if known[sha][0] in kept} | writer.written
    index = pd.DataFrame(rows, columns=["path", "label", "sha256"])
    placed = [places[sha] for sha in index["sha256"]]
    index["shard"] = [p[0] for p in placed]
    index["offset"] = np.array([p[1] for p in placed], dtype=np.int64)
    index["size"] = np.array([p[2] for p in placed], dtype=np.int64)
    index = index.sort_values("path", kind="stable").reset_index(drop=True)
    index.to_parquet(target / INDEX, index=False)
    new_bytes = sum((target / SHARDS / s).stat().st_size for s in writer.shards)
    all_bytes = sum(p.stat().st_size for p in (target / SHARDS).iterdir())
    return Written(
        files=len(index),
        reused=int(sum(sha in places and places[sha][0] in kept for sha in index["sha256"])),
        shards=len(kept) + len(writer.shards),
        new_shards=len(writer.shards),
        new_bytes=new_bytes,
        bytes=all_bytes,
    )


def _places(store: RawStore) -> dict[str, tuple[str, int, int]]:
    """sha256 → (shard, offset, size) for every image of ``store`` whose shard is there."""
    index = store.index.drop_duplicates("sha256")
    present = {s for s in index["shard"].unique() if store.shard_path(s).is_file()}
    index = index[index["shard"].isin(present)]
    return {
        sha: (shard, int(offset), int(size))
        for sha, shard, offset, size in zip(
            index["sha256"], index["shard"], index["offset"], index["size"], strict=True
        )
    }


def _worth_keeping(store: RawStore, live: list[tuple[str, int, int]]) -> set[str]:
    """The shards whose ``live`` members (header and padding counted) fill at least
    ``KEEP_LIVE_SHARE`` of their members."""
    filled: dict[str, int] = {}
    for shard, _, size in live:
        filled[shard] = filled.get(shard, 0) + _footprint(size)
    return {
        shard
        for shard, used in filled.items()
        if used >= KEEP_LIVE_SHARE * (store.shard_path(shard).stat().st_size - _TAR_END)
    }


def _footprint(size: int) -> int:
    """Bytes a member of ``size`` takes in a tar: its header and its padded data."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _suffix_in(store: RawStore, shard: str, offset: int) -> str:
    """The suffix of the member whose data starts at ``offset`` (its name, in its header)."""
    with open(store.shard_path(shard), "rb") as fh:
        header = os.pread(fh.fileno(), tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE)
    name = header[:100].rstrip(b"\0").decode("ascii", "replace")
    return name[64:]


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(source, dest)
