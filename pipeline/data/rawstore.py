"""The raw store: the images download accepted, as content-addressed tar shards and an index.

DVC hashes, caches and pushes each file it tracks, so a million images kept as a million
files make every check and push linear in files (treeverse/dvc#7607). The store packs them
into shards of about ``SHARD_BYTES``, each named by its own sha256 and never rewritten:
DVC tracks hundreds of files, and a run after the data grew adds, and pushes, only new
shards. ``paths.raw`` holds

- ``shards/<sha256>.tar``: uncompressed tar in the WebDataset layout, one member per
  distinct image, named ``<image sha256><suffix>``; the same input gives the same bytes
  (fixed member metadata), so two machines that download the same data share the shards;
- ``index/``: one row per image file: ``path`` (``<class>/<file>``), ``label``,
  ``sha256``, ``shard``, ``offset`` and ``size`` of its bytes in the shard; a segmented
  table (``segments.py``), so a run that added images adds a segment with their rows.

Stages name an image by its logical path ``<paths.raw>/<class>/<file>`` (the manifest and
the split tables keep it) and read its bytes through :meth:`RawStore.locate`, which gives
an :class:`ImageRef`: random access by offset, no extraction.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data import segments
from pipeline.data.filehashes import FileHashes
from pipeline.data.images import ImageRef, ImageRefs
from pipeline.errors import DataError
from pipeline.system.fsutil import link_or_copy, remove, sha256_file

if TYPE_CHECKING:
    import pandas as pd

INDEX = "index"
SHARDS = "shards"
INDEX_COLUMNS = ["path", "label", "sha256", "shard", "offset", "size"]
# A shard closes once it holds this many bytes. At realistic JPEG sizes (~100 kB) a million
# images make ~1,500 shards; at 2 kB thumbnails, ~30.
SHARD_BYTES = 64 << 20
# A kept shard whose live images fill less than this share of it is not kept: its live
# images are written again into the new shards, so deleted images do not pin space forever.
KEEP_LIVE_SHARE = 0.5
# The largest file the store takes: well above any image, below what one read returns.
MAX_FILE_BYTES = 1 << 30
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")
_TAR_END = 2 * tarfile.BLOCKSIZE


@dataclass(frozen=True, eq=False)
class RawStore:
    """The store at ``root``, its index read once."""

    root: Path
    index: pd.DataFrame

    @classmethod
    def open_if_there(cls, root: Path) -> RawStore | None:
        """The store, or None where download has not written one."""
        return cls.open(root) if segments.exists(Path(root) / INDEX) else None

    @classmethod
    def open(cls, root: Path) -> RawStore:
        path = Path(root) / INDEX
        if not segments.exists(path):
            raise DataError(f"{path} does not exist: run the download stage first")
        index = segments.read_table(path, "path")
        if list(index.columns) != INDEX_COLUMNS:
            raise DataError(f"{path}: columns {list(index.columns)}, expected {INDEX_COLUMNS}")
        return cls(Path(root), index)

    def logical(self, key: str) -> str:
        """The path stages and tables name the image ``<class>/<file>`` by."""
        return f"{self.root.as_posix()}/{key}"

    def files(self) -> list[tuple[str, str]]:
        """(logical path, label) for every image file, sorted by path."""
        paths = (self.root.as_posix() + "/" + self.index["path"]).tolist()
        return list(zip(paths, self.index["label"].tolist(), strict=True))

    def shard_path(self, shard: str) -> Path:
        return self.root / SHARDS / shard

    @cached_property
    def _keys(self) -> pd.Index:
        import pandas as pd

        return pd.Index(self.root.as_posix() + "/" + self.index["path"])

    def locate(self, paths: Iterable[str]) -> ImageRefs:
        """Where each logical path's bytes are; an unknown path is a one-line error."""
        import pandas as pd

        wanted = pd.Index([str(p) for p in paths], dtype=object)
        found = self._keys.get_indexer(wanted)
        if (found < 0).any():
            missing = wanted[found < 0]
            raise DataError(
                f"{missing[0]} is not in the raw store {self.root / INDEX} ({len(missing)} "
                "missing): rerun download, then the stages after it"
            )
        codes, shards = pd.factorize(self.index["shard"].to_numpy()[found])
        folder = (self.root / SHARDS).as_posix()
        return ImageRefs(
            [f"{folder}/{s}" for s in shards],
            codes.astype(np.int32),
            self.index["offset"].to_numpy()[found],
            self.index["size"].to_numpy()[found],
            wanted.to_numpy(),
        )

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
    hashes: FileHashes | None = None,
) -> Written:
    """Write the store for ``files`` ((key ``<class>/<file>``, label, source file)) into
    the empty folder ``target``, reading each source file once, in key order: the same
    files and the same ``previous`` give the same shards, whatever order they come in.

    Images that a shard of ``previous`` holds are not written again: the shard is
    hard-linked (or copied) in, unless its live images now fill less than
    ``KEEP_LIVE_SHARE`` of it; then they go into the new shards with the new images.

    With ``hashes``, a source file whose recorded sha256 still holds (``filehashes``) and
    whose image a kept shard or this run already holds is not read; every file's sha256
    is recorded into it."""
    import pandas as pd

    rows: list[tuple[str, str, str]] = []
    sources: list[Path] = []  # each row's file, for the images moved out of a thinned shard
    known = _places(previous) if previous is not None else {}
    writer = ShardWriter(target / SHARDS, limit)
    try:
        for key, label, source in sorted(files, key=lambda file: file[0]):
            stat = source.stat()
            sha = hashes.sha256(source, stat) if hashes is not None else None
            if sha is None or (sha not in known and sha not in writer.written):
                data = _image_bytes(key, source, stat)
                sha = hashlib.sha256(data).hexdigest()
                if sha not in known and sha not in writer.written:
                    writer.add(sha, source.suffix.lower(), data)
            if hashes is not None:
                hashes.record(source, stat, sha)
            rows.append((key, label, sha))
            sources.append(source)
        live = dict.fromkeys(sha for _, _, sha in rows if sha in known)
        kept = _worth_keeping(previous, [known[sha] for sha in live]) if live else set()
        moved = [sha for sha in live if known[sha][0] not in kept]
        if moved:  # the live images of shards not kept: written again, in order
            first = {}
            for (key, _, sha), source in zip(rows, sources, strict=True):
                first.setdefault(sha, (key, source))
            for sha in moved:
                shard, offset, size = known[sha]
                key, source = first[sha]
                data = ImageRef(str(previous.shard_path(shard)), offset, size, sha).read()
                if hashlib.sha256(data).hexdigest() != sha:  # a damaged shard: the source
                    data = _image_bytes(key, source, source.stat())
                    if hashlib.sha256(data).hexdigest() != sha:
                        raise DataError(
                            f"{key}: {source} changed while it was read; run download again"
                        )
                writer.add(sha, source.suffix.lower(), data)  # named as if new
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    (target / SHARDS).mkdir(parents=True, exist_ok=True)
    for shard in sorted(kept):
        link_or_copy(previous.shard_path(shard), target / SHARDS / shard)
    del sources
    places = {sha: known[sha] for sha in live if known[sha][0] in kept} | writer.written
    del known, live
    reused = sum(places[sha][0] in kept for _, _, sha in rows)
    index = pd.DataFrame(rows, columns=["path", "label", "sha256"])
    del rows  # the index holds them now: a million tuples are ~200 MB
    placed = [places[sha] for sha in index["sha256"]]
    index["shard"] = [p[0] for p in placed]
    index["offset"] = np.array([p[1] for p in placed], dtype=np.int64)
    index["size"] = np.array([p[2] for p in placed], dtype=np.int64)
    del placed, places
    segments.write_table(index, target / INDEX, "path", previous.root / INDEX if previous else None)
    new_bytes = sum((target / SHARDS / s).stat().st_size for s in writer.shards)
    all_bytes = sum(p.stat().st_size for p in (target / SHARDS).iterdir())
    return Written(
        files=len(index),
        reused=reused,
        shards=len(kept) + len(writer.shards),
        new_shards=len(writer.shards),
        new_bytes=new_bytes,
        bytes=all_bytes,
    )


def _image_bytes(key: str, source: Path, stat: os.stat_result) -> bytes:
    """The bytes of ``source`` (``stat`` taken before), stored as ``key``; a file too large
    to be an image is a one-line error (a tar member and one read by offset have their
    limits)."""
    size = stat.st_size
    if size > MAX_FILE_BYTES:
        raise DataError(
            f"{key}: {size:,} bytes, more than the {MAX_FILE_BYTES:,} a file in the raw store "
            "may have; remove it from the source"
        )
    data = source.read_bytes()
    if len(data) != size:
        raise DataError(f"{key}: {source} changed while it was read; run download again")
    return data


def _places(store: RawStore) -> dict[str, tuple[str, int, int]]:
    """sha256 → (shard, offset, size) for every image of ``store`` whose shard is whole."""
    index = store.index.drop_duplicates("sha256")
    ends = (index["offset"] + index["size"]).groupby(index["shard"]).max()
    present = {  # a shard cut short (a damaged workspace) is not kept: written again
        shard
        for shard, end in ends.items()
        if store.shard_path(shard).is_file()
        and store.shard_path(shard).stat().st_size >= end + _TAR_END
    }
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
