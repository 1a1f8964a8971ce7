"""The sha256 of the source's files, kept by (path, device, inode, size, mtime) in the memo.

download stores each image by its sha256. Without this it reads and hashes every file of
the source on every run, so a run after 1% more images arrived costs a full read of the
dataset. Like DVC's own state database, a file whose path, device, inode, size and
modification time (in nanoseconds) are those recorded keeps its recorded sha256; an image a
kept shard holds is then not read at all. A file edited in place gets a new mtime, a file
replaced by a rename a new inode: both are read again.

Only files that outlive the run are recorded: those of a folder source, not those download
unpacked or linked into its temporary folder (an archive's members, an S3 prefix's
objects), whose inodes the next run may reuse for other bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.system import memo

COLUMNS = ["path", "device", "inode", "size", "mtime_ns", "sha256"]
Signature = tuple[int, int, int, int]  # device, inode, size, mtime_ns


def signature(stat: os.stat_result) -> Signature:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass
class FileHashes:
    """Recorded sha256s by path and signature; ``record`` collects this run's."""

    known: dict[str, tuple[Signature, str]] = field(default_factory=dict)
    recorded: dict[str, tuple[Signature, str]] = field(default_factory=dict)
    transient: str | None = None  # absolute path of a folder whose files are not recorded

    def sha256(self, path: Path, stat: os.stat_result) -> str | None:
        """The recorded sha256 of ``path``, if its signature is unchanged."""
        kept = self.known.get(str(path))
        return kept[1] if kept is not None and kept[0] == signature(stat) else None

    def record(self, path: Path, stat: os.stat_result, sha256: str) -> None:
        if self.transient is None or not os.path.abspath(path).startswith(self.transient):
            self.recorded[str(path)] = (signature(stat), sha256)


def entry_key(source: str) -> str:
    """One entry per source (``data.source``): pointing at another keeps the last three."""
    return memo.digest({"source": source})


def load(root: Path, source: str, transient: Path | None = None) -> FileHashes:
    """The hashes kept for ``source`` under the memo ``root`` (none when there are none or
    the entry cannot be read: a warning, then every file is read)."""
    known = memo.Store(root, memo.FILE_HASHES).get(entry_key(source), _read) or {}
    inside = None if transient is None else os.path.join(os.path.abspath(transient), "")
    return FileHashes(known=known, transient=inside)


def save(root: Path, source: str, hashes: FileHashes) -> None:
    """Keep this run's hashes for ``source``: the files it saw, replacing the last run's."""
    import pandas as pd

    rows = [
        (path, device, inode, size, mtime, sha)
        for path, ((device, inode, size, mtime), sha) in sorted(hashes.recorded.items())
    ]
    table = pd.DataFrame(rows, columns=COLUMNS)
    memo.Store(root, memo.FILE_HASHES).put(
        entry_key(source), lambda tmp: table.to_parquet(tmp, index=False)
    )


def _read(path: Path) -> dict[str, tuple[Signature, str]]:
    import pandas as pd

    table = pd.read_parquet(path)
    if list(table.columns) != COLUMNS:
        raise ValueError(f"columns {list(table.columns)}, expected {COLUMNS}")
    columns = [table[c].tolist() for c in COLUMNS]
    return {
        path: ((device, inode, size, mtime), sha)
        for path, device, inode, size, mtime, sha in zip(*columns, strict=True)
    }
