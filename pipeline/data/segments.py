"""Tables kept as a folder of Parquet segments, so a run that changes 1% of the rows
writes, and DVC pushes, about 1% of the table.

DVC stores and pushes a changed file whole. At a million images the raw store's index, the
manifest and the split table are 70–110 MB each; written whole, a run that added 1% of the
images would push each again. A segmented table is a folder of ``part-<n>.parquet`` files:
the first (the base) holds every row as of some run, each later one the rows a run added or
changed and, marked ``_deleted``, the rows it removed. A later segment's row overrides an
earlier one with the same key. Reading applies them in order and gives the live rows
sorted by key, so the table read back is the table written, whatever its history.

A run links the segments it keeps (the output is persisted, so DVC leaves them in place
and knows their hashes) and writes one new segment, so that what every run writes is
bounded by what changed:

- growth adds segments; past ``MAX_SEGMENTS`` the two adjacent later segments with the
  fewest rows are merged into one (a write of a few percent of the table, not all of it);
- the base is written again only when the segments would hold twice the table's rows
  (as many overridden and removed rows as live ones: a changed seed, a replaced dataset);
- a run whose table is the one an earlier run left (a change undone) keeps exactly the
  segments that run had, so the folder, and every stage after it, is as it was then.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import DataError
from pipeline.system.fsutil import link_or_copy

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

DELETED = "_deleted"  # the column a segment marks removed rows with
MAX_SEGMENTS = 16
_SEGMENT = re.compile(r"part-(\d{6})\.parquet")


@dataclass(frozen=True)
class TableWritten:
    """What :func:`write_table` did: the segments the table now has, the rows it wrote
    (new segment and merge), and whether it wrote the table whole."""

    segments: int
    rows_written: int
    compacted: bool


def segment_files(folder: Path) -> list[Path]:
    """The segments of the table at ``folder``, oldest first; [] when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _SEGMENT.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def exists(folder: Path) -> bool:
    return bool(segment_files(folder))


def read_table(folder: Path, key: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The live rows of the table at ``folder``, sorted by ``key``; a missing or unreadable
    table is a one-line error naming the file."""
    files = segment_files(folder)
    if not files:
        raise DataError(f"{folder} holds no table (no part-*.parquet)")
    return _live(files, key, columns)


def write_table(
    table: pd.DataFrame, target: Path, key: str, previous: Path | None = None
) -> TableWritten:
    """Write ``table`` (``key`` unique) as segments into the empty folder ``target``.

    With ``previous`` (the table's folder as the last run left it), its segments are linked
    in and only the rows added, changed or removed since are written, as one new segment
    in the base's Arrow schema; an unreadable ``previous``, or one whose columns or types
    differ, is not reused."""
    if DELETED in table.columns:
        raise ValueError(f"a table may not have a column named {DELETED}")
    duplicated = table[key].duplicated()
    if duplicated.any():
        raise DataError(f"{key} {table[key][duplicated].iloc[0]!r} is in the table twice")
    table = table.sort_values(key, kind="stable").reset_index(drop=True)
    target.mkdir(parents=True, exist_ok=True)
    kept = segment_files(previous) if previous is not None else []
    last, schema = None, None
    if kept:
        try:
            schema, last = _schema(kept[0]), _live(kept, key)
        except DataError as exc:
            log.warning("%s; writing the table anew", exc)
    if last is None or not _fits(_text_as_one(_schema_of(table)), schema):
        return _written(target, _write_base(table, target))

    delta = _changes(last, table, key)
    del last
    undone = _undone_to(kept, table, key, delta) if len(delta) else len(kept)
    if undone is not None:  # nothing changed, or back to what an earlier run left
        _link(kept[:undone], target)
        return _written(target, TableWritten(undone, 0, False))
    if sum(_rows(file) for file in kept) + len(delta) >= 2 * len(table):
        return _written(target, _write_base(table, target))
    _link(kept, target)
    number = int(_SEGMENT.fullmatch(kept[-1].name).group(1)) + 1
    _write_segment(_arrow_as(delta, schema), target / f"part-{number:06d}.parquet")
    merged = _merge_smallest_pair(target, key, schema) if len(kept) + 1 > MAX_SEGMENTS else 0
    return _written(target, TableWritten(len(segment_files(target)), len(delta) + merged, False))


def _written(target: Path, written: TableWritten) -> TableWritten:
    log.info(
        "%s: %d segments, %d rows written%s",
        target.name,
        written.segments,
        written.rows_written,
        " (the whole table)" if written.compacted else "",
    )
    return written


def _live(files: list[Path], key: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The live rows the segments ``files`` (oldest first) make, sorted by ``key``."""
    table = _concat([_read(file, key, columns) for file in files], key)
    if table[DELETED].any():
        table = table[~table[DELETED]]
    table = table.drop(columns=DELETED)
    if not table[key].is_monotonic_increasing:
        table = table.sort_values(key, kind="stable")
    return table.reset_index(drop=True)


def _read(file: Path, key: str, columns: list[str] | None = None) -> pd.DataFrame:
    import pandas as pd

    wanted = None if columns is None else list(dict.fromkeys([key, *columns, DELETED]))
    try:
        return pd.read_parquet(file, columns=wanted)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds; name the file
        raise DataError(f"{file}: not a readable table segment ({exc})") from exc


def _concat(frames: list[pd.DataFrame], key: str) -> pd.DataFrame:
    """Segments' rows, oldest first, each key's last row kept (removal marks included)."""
    import pandas as pd

    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True).drop_duplicates(key, keep="last")


def _schema(file: Path) -> pa.Schema:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(file)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds; name the file
        raise DataError(f"{file}: not a readable table segment ({exc})") from exc


def _schema_of(table: pd.DataFrame) -> pa.Schema:
    """The Arrow schema of ``table``'s segments (with the ``DELETED`` column)."""
    import pyarrow as pa

    return pa.Schema.from_pandas(table.head(0).assign(**{DELETED: False}), preserve_index=False)


def _text_as_one(schema: pa.Schema) -> pa.Schema:
    """Text as one type whatever pandas held it in (``str`` or objects); a column with no
    value yet (Arrow's null type) is taken as text, so that a first value later does not
    change the table's type."""
    import pyarrow as pa

    text = (pa.null(), pa.string())
    fields = [f.with_type(pa.large_string()) if f.type in text else f for f in schema]
    return pa.schema(fields, metadata=schema.metadata)


def _arrow_as(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def _fits(new: pa.Schema, kept: pa.Schema) -> bool:
    """Whether rows of schema ``new`` can join segments of schema ``kept``: the same columns
    of the same types."""
    return new.names == kept.names and all(a.type == b.type for a, b in zip(new, kept, strict=True))


def _changes(last: pd.DataFrame, table: pd.DataFrame, key: str) -> pd.DataFrame:
    """The rows of ``table`` that ``last`` lacks or holds otherwise, and ``last``'s rows
    whose key ``table`` lacks, marked deleted; sorted by key. Both have the same columns
    and types (read back through the same Arrow schema)."""
    import numpy as np
    import pandas as pd

    at = pd.Index(last[key]).get_indexer(table[key])  # each row's place in last, or -1
    same = at >= 0
    if same.any():
        before = last.take(np.where(same, at, 0)).reset_index(drop=True)
        for column in table.columns:
            now, then = table[column].reset_index(drop=True), before[column]
            equal = now.eq(then).fillna(False).to_numpy(dtype=bool)
            same &= equal | (now.isna() & then.isna()).to_numpy(dtype=bool)
    changed = table[~same]
    removed = last[~last[key].isin(table[key])]
    delta = pd.concat(
        [changed.assign(**{DELETED: False}), removed.assign(**{DELETED: True})],
        ignore_index=True,
    )
    return delta.sort_values(key, kind="stable").reset_index(drop=True)


def _undone_to(kept: list[Path], table: pd.DataFrame, key: str, delta: pd.DataFrame) -> int | None:
    """How many of the ``kept`` segments make ``table`` by themselves, when a change since
    them was undone; None when none do. Looked for only where every changed row is one
    that the later segments changed (an undo touches nothing else)."""
    if len(kept) < 2:
        return None
    later = _concat([_read(file, key, []) for file in kept[1:]], key)[key]
    if not delta[key].isin(later).all():
        return None
    for count in range(len(kept) - 1, 0, -1):
        if _changes(_live(kept[:count], key), table, key).empty:
            return count
    return None


def _merge_smallest_pair(target: Path, key: str, schema: pa.Schema) -> int:
    """Merge the two adjacent later segments with the fewest rows into one (named as the
    newer); returns the rows written."""
    files = segment_files(target)
    sizes = [_rows(file) for file in files]
    first = min(range(1, len(files) - 1), key=lambda i: sizes[i] + sizes[i + 1])
    older, newer = files[first], files[first + 1]
    merged = _concat([_read(older, key), _read(newer, key)], key).sort_values(key, kind="stable")
    tmp = target / f".{newer.name}.merge"
    _write_segment(_arrow_as(merged, schema), tmp)
    os.replace(tmp, newer)  # a new file, not a write through the link to the last run's
    older.unlink()
    return len(merged)


def _link(files: list[Path], target: Path) -> None:
    for file in files:
        link_or_copy(file, target / file.name)


def _write_base(table: pd.DataFrame, target: Path) -> TableWritten:
    import pyarrow as pa

    rows = pa.Table.from_pandas(table.assign(**{DELETED: False}), preserve_index=False)
    rows = rows.cast(_text_as_one(rows.schema))
    _write_segment(rows, target / "part-000000.parquet")
    return TableWritten(1, rows.num_rows, True)


def _write_segment(rows: pa.Table, path: Path) -> None:
    """Write ``rows`` to ``path`` and flush it to disk before the folder is renamed in."""
    import pyarrow.parquet as pq

    pq.write_table(rows, path)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _rows(file: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).metadata.num_rows


def main(argv: list[str]) -> int:
    """``python -m pipeline table FOLDER``: the live rows of a segmented table, as CSV on
    stdout (``--key``: the column rows are keyed by, ``path`` for the pipeline's tables)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline table", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="e.g. data/splits, data/manifest, data/raw/index")
    parser.add_argument("--key", default="path")
    args = parser.parse_args(argv)
    try:
        table = read_table(args.folder, args.key)
    except DataError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    try:
        table.to_csv(sys.stdout, index=False)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
