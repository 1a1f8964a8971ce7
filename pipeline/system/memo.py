"""Derived work kept by content under ``paths.memo``: one store per kind, one key rule.

What a stage computes and may need again (image facts, embeddings, ONNX graphs, backbone
weights, int8 calibrations, backbone outputs) is kept here under a key of everything that
changes it, so a later run that changes something else reuses it. None of it is a DVC output: DVC
tracks what a stage writes, the memo only makes writing it faster, and any entry may be
deleted at any time (it is computed again). docs/memo.md tables the kinds.

Every kind reads the same way (``Store.get``: a damaged or unreadable entry is reported
with its path and read as missing), writes the same way (``Store.put``: a temporary, then
a rename, so an entry is whole or absent; a full disk names ``paths.memo``) and keeps
only its ``kept`` most recently used entries after each write (a read marks an entry as
used). Keys come from one function, ``digest``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pipeline.system.diskfull import disk_full_is_an_error
from pipeline.system.fsutil import atomic_path, remove, touch

log = logging.getLogger(__name__)
T = TypeVar("T")

SETTING = "paths.memo"  # the params.yaml key a full disk's error names
KEY_CHARS = 24  # hex digits of sha256 a key keeps: 96 bits, no collision among a kind's entries
SHARD = "shard-*.npz"  # the files of an append-only entry (``Store.add_shard``)


@dataclass(frozen=True)
class Kind:
    """One kind of kept work.

    Args:
        folder: its folder under ``paths.memo``.
        kept: how many entries stay, the least recently used removed first; None: all.
        suffix: ``""``, an entry is a folder ``<key>/``; otherwise a file ``<key><suffix>``.
        redo: what the reader of a damaged entry does instead, for the warning.
    """

    folder: str
    kept: int | None
    suffix: str = ""
    redo: str = "making it again"


# Every kind and its bound, in this one place (sizes: Lite0 on Caltech-101).
# Embeddings by image sha256, append-only shards per backbone, engine and view: all kept,
# as before the memo (5 kB per image at 1280-d; a rerun computes only new images).
FEATURES = Kind("features", None, redo="computing its embeddings again")
# What validate found decoding each image, by sha256, append-only shards per version of the
# decoding code and Pillow (about 200 B per image): the current and the last 3 versions.
IMAGE_FACTS = Kind("image_facts", 4, redo="decoding its images again")
# The fp32 PyTorch reference's backbone features per model, by image sha256 (9 MB each for
# Caltech's test split): every fine-tuned backbone is a new one.
REFERENCE = Kind("reference", 8, redo="running the backbone again")
# ONNX graphs by their tensors, byte for byte: every fine-tuned backbone is a new one (13 MB).
GRAPHS = Kind("graphs", 8, ".onnx")
# ONNX graphs by structure (unoptimised exports): one per architecture, input and opset.
GRAPH_STRUCTURES = Kind("graphs/structures", 4, ".onnx")
# The backbone part's int8 ranges and its outputs: as many as kept graphs.
CALIBRATIONS = Kind("calibration", 8, redo="calibrating again")
# onnx_check's backbone-part outputs: two files (fp32, int8) for each of 8 backbones, 9 MB each.
ONNX_OUTPUTS = Kind("onnx_outputs", 16, redo="running the backbone part again")
# Built backbones' state dicts: 13-30 MB each for the registry's backbones.
BACKBONE_STATES = Kind("backbone_states", 4, redo="building the backbone again")
# What data_issues found, by the images' sha256s and labels, the embedding and its settings
# (under 100 kB for Caltech-101): the current data and the last 3.
DATA_ISSUES = Kind("data_issues", 4, ".json", redo="finding them again")
# The sha256 of each source file by (path, inode, size, mtime), per data.source (about
# 150 B per file): download reads only new and changed files. The current source and the last 3.
FILE_HASHES = Kind(
    "file_hashes", 4, ".parquet", redo="reading and hashing the source's files again"
)

KINDS = (
    FEATURES,
    IMAGE_FACTS,
    REFERENCE,
    GRAPHS,
    GRAPH_STRUCTURES,
    CALIBRATIONS,
    ONNX_OUTPUTS,
    BACKBONE_STATES,
    DATA_ISSUES,
    FILE_HASHES,
)


def digest(spec: object) -> str:
    """The key of kept work from ``spec``, everything that changes it (JSON-able: dicts,
    lists, strings, numbers): sha256 of its key-sorted JSON, ``KEY_CHARS`` hex digits."""
    text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


class Store:
    """The entries of one ``kind`` under the memo folder ``root`` (``paths.memo``)."""

    def __init__(self, root: Path, kind: Kind) -> None:
        self.kind = kind
        self.folder = Path(root) / kind.folder

    def path(self, key: str) -> Path:
        """Where the entry ``key`` is (a folder, or a file for a kind with a suffix)."""
        return self.folder / f"{key}{self.kind.suffix}"

    def get(self, key: str, read: Callable[[Path], T]) -> T | None:
        """``read(path)`` of the entry ``key``, marked as used; None when there is none, or
        when ``read`` fails on it (cut short, overwritten, refused): a warning names it,
        and the caller makes it again and ``put``s it over."""
        path = self.path(key)
        if not path.exists():
            return None
        ok, value = self._read(path, read)
        if not ok:
            return None
        touch(path)
        return value

    def put(self, key: str, write: Callable[[Path], None]) -> Path:
        """Write the entry ``key`` with ``write(tmp)``: a temporary file, or an empty
        temporary folder for a kind without suffix, renamed onto the entry once ``write``
        returns (if it raises, nothing is kept). Then evict; returns the entry's path."""
        path = self.path(key)
        with disk_full_is_an_error(path, SETTING):
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                if not self.kind.suffix:
                    tmp.mkdir()
                write(tmp)
        self.evict()
        return path

    def shards(self, key: str, read: Callable[[Path], T]) -> list[T]:
        """``read`` of each shard of the append-only entry ``key``, oldest first
        (``each_shard``, held together)."""
        return list(self.each_shard(key, read))

    def each_shard(self, key: str, read: Callable[[Path], T]) -> Iterator[T]:
        """``read`` of each shard of the append-only entry ``key``, oldest first, one at a
        time (an entry may be larger than memory); the entry is marked as used. A shard
        ``read`` fails on is warned about and removed (it would never be overwritten): what
        it held is computed again."""
        entry = self.path(key)
        found = False
        for shard in sorted(entry.glob(SHARD)):
            ok, value = self._read(shard, read)
            if ok:
                found = True
                yield value
            else:
                remove(shard)
        if found:
            touch(entry)

    def add_shard(self, key: str, content: object, write: Callable[[Path], None]) -> Path:
        """Write a new shard into the entry ``key`` with ``write(tmp)``, atomically; its
        name holds the time and ``digest(content)`` (what it holds), so writers never clash.
        Then evict; returns the shard's path."""
        entry = self.path(key)
        shard = entry / SHARD.replace("*", f"{time.time_ns()}-{digest(content)}")
        with disk_full_is_an_error(shard, SETTING):
            entry.mkdir(parents=True, exist_ok=True)
            with atomic_path(shard) as tmp:
                write(tmp)
        self.evict()
        return shard

    def entries(self) -> list[Path]:
        """This kind's entries (not temporaries, nor other kinds' folders inside it)."""
        if not self.folder.is_dir():
            return []
        suffix = self.kind.suffix
        return [
            e
            for e in self.folder.iterdir()
            if not e.name.startswith(".")
            and (e.is_file() and e.name.endswith(suffix) if suffix else e.is_dir())
        ]

    def evict(self) -> None:
        """Remove all but the kind's ``kept`` most recently used entries (by mtime: a read
        touches the entry). What is kept by content must not grow with every run."""
        if self.kind.kept is None:
            return
        for old in sorted(self.entries(), key=_used, reverse=True)[self.kind.kept :]:
            with contextlib.suppress(FileNotFoundError):  # another writer evicted it
                remove(old)

    def _read(self, path: Path, read: Callable[[Path], T]) -> tuple[bool, T | None]:
        try:
            return True, read(path)
        except Exception as exc:  # each format's library raises its own errors on a bad file
            log.warning("%s cannot be used (%s); %s", path, exc, self.kind.redo)
            return False, None


def _used(entry: Path) -> float:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return -math.inf
