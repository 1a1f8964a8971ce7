"""The split table (``paths.splits``): every usable image's path, label, sha256 and split,
as a segmented table (``segments.py``), and its readers.

One table, not a file per split: an image that moves from train to val when the data grows
is one changed row, so a run that added 1% of the images writes about 1% of the table.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from pipeline.config import Paths
from pipeline.data import segments
from pipeline.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "val", "test")
KEY = "path"
ROW_COLUMNS = ["path", "label", "sha256"]  # what a split's rows carry
COLUMNS = [*ROW_COLUMNS, "split"]


def read_splits(paths: Paths) -> pd.DataFrame:
    """Every row (path, label, sha256, split), sorted by path. pandas is imported here,
    when a table is read: finetune with ``epochs: 0`` reads none and starts 0.25 s sooner."""
    if not segments.exists(paths.splits):
        raise DataError(f"{paths.splits} does not exist: run the split stage first")
    table = segments.read_table(paths.splits, KEY)
    if list(table.columns) != COLUMNS:
        raise DataError(f"{paths.splits}: columns {list(table.columns)}, expected {COLUMNS}")
    return table


def rows_of(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """One split's rows (path, label, sha256) of the table ``read_splits`` gave, by path."""
    return table.loc[table["split"] == split, ROW_COLUMNS].reset_index(drop=True)


def in_split_order(table: pd.DataFrame, splits: tuple[str, ...] = SPLITS) -> pd.DataFrame:
    """The rows (path, label, sha256, split) of ``splits``, split after split in that
    order, each by path: the row order of the features arrays concatenated."""
    import pandas as pd

    return pd.concat([table[table["split"] == s] for s in splits], ignore_index=True)


def read_split(paths: Paths, split: str) -> pd.DataFrame:
    """One split's rows (path, label, sha256), sorted by path."""
    return rows_of(read_splits(paths), split)


def rows_digest(rows: pd.DataFrame) -> str:
    """sha256 of a split's rows written as CSV (header, ``\\n`` line ends): the sha256 its
    ``<split>.csv`` file had when the split tables were CSV files, so lineage recorded then
    still matches."""
    return hashlib.sha256(rows[ROW_COLUMNS].to_csv(index=False).encode()).hexdigest()


def write_splits(table: pd.DataFrame, paths: Paths, target) -> segments.TableWritten:
    """Write ``table`` (``COLUMNS``) into ``target``, reusing the segments of the table now at
    ``paths.splits``."""
    return segments.write_table(table[COLUMNS], target, KEY, paths.splits)
