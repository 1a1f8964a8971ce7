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
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.system import memo

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

COLUMNS = ["path", "device", "inode", "size", "mtime_ns", "sha256"]
SIGNATURE = COLUMNS[1:5]  # what must be as recorded for the sha256 to hold


@dataclass
class Kept:
    """The last run's record, as arrays (a million files: about 200 MB, not a gigabyte of
    tuples): paths in a hashed index, signatures as one int64 row each, sha256s as bytes."""

    paths: pd.Index
    signatures: np.ndarray  # (n, 4) int64, SIGNATURE's columns
    sha256s: np.ndarray  # (n,) S64


@dataclass
class FileHashes:
    """Recorded sha256s by path and signature; ``record`` collects this run's."""

    kept: Kept | None = None
    transient: str | None = None  # absolute path of a folder whose files are not recorded
    paths: list[str] = field(default_factory=list)
    numbers: array = field(default_factory=lambda: array("q"))  # SIGNATURE, 4 per file
    sha256s: list[str] = field(default_factory=list)

    def sha256(self, path: Path, stat: os.stat_result) -> str | None:
        """The recorded sha256 of ``path``, if its signature is unchanged."""
        if self.kept is None:
            return None
        try:
            at = self.kept.paths.get_loc(str(path))
        except KeyError:
            return None
        if tuple(self.kept.signatures[at].tolist()) != _signature(stat):
            return None
        return self.kept.sha256s[at].decode()

    def record(self, path: Path, stat: os.stat_result, sha256: str) -> None:
        if self.transient is None or not os.path.abspath(path).startswith(self.transient):
            self.paths.append(str(path))
            self.numbers.extend(_signature(stat))
            self.sha256s.append(sha256)

    def table(self) -> pd.DataFrame:
        import numpy as np
        import pandas as pd

        numbers = np.frombuffer(self.numbers, dtype=np.int64).reshape(-1, len(SIGNATURE))
        table = pd.DataFrame(numbers, columns=SIGNATURE)
        table.insert(0, "path", self.paths)
        table["sha256"] = self.sha256s
        return table


def _signature(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def entry_key(source: str) -> str:
    """One entry per source (``data.source``): pointing at another keeps the last three."""
    return memo.digest({"source": source})


def load(root: Path, source: str, transient: Path | None = None) -> FileHashes:
    """The hashes kept for ``source`` under the memo ``root`` (none when there are none or
    the entry cannot be read: a warning, then every file is read)."""
    kept = memo.Store(root, memo.FILE_HASHES).get(entry_key(source), _read)
    inside = None if transient is None else os.path.join(os.path.abspath(transient), "")
    return FileHashes(kept=kept, transient=inside)


def save(root: Path, source: str, hashes: FileHashes) -> None:
    """Keep this run's hashes for ``source``: the files it saw, replacing the last run's."""
    table = hashes.table()
    memo.Store(root, memo.FILE_HASHES).put(
        entry_key(source), lambda tmp: table.to_parquet(tmp, index=False)
    )


def _read(path: Path) -> Kept:
    import numpy as np
    import pandas as pd

    table = pd.read_parquet(path)
    if list(table.columns) != COLUMNS:
        raise ValueError(f"columns {list(table.columns)}, expected {COLUMNS}")
    paths = pd.Index(table["path"].to_numpy(dtype=object))
    if not paths.is_unique:
        raise ValueError("a path recorded twice")
    return Kept(
        paths,
        table[SIGNATURE].to_numpy(dtype=np.int64),
        table["sha256"].to_numpy(dtype="S64"),
    )
