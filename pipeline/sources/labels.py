"""Labels from a table (``data.labels``): one row per image, its path and its label.

Many datasets ship their images in one folder plus a CSV or Parquet table instead of one
folder per class. Reading the table here, before anything is laid out, lets ``download``
write the same ``<class>/<file>`` tree a folder dataset gets, so validate, split and the
feature cache cannot tell the two apart. Rows that cannot be used (a missing file, a file
with two labels, an empty label, a path outside the root) and image files that no row
names are set aside with their reason in :data:`LABEL_ROW_COLUMNS` rows, which validate
puts in the quarantine beside undecodable images: listed, never dropped silently.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.config import LabelColumns
from pipeline.errors import DataError
from pipeline.system.fsutil import IMAGE_SUFFIXES, is_os_litter

log = logging.getLogger(__name__)

# What download writes to paths.label_rows and validate reads: every row of the table, and
# every image file that no row names, with what became of it (``issue`` empty when used).
LABEL_ROW_COLUMNS = ["row", "path", "label", "raw", "issue", "reason"]

# The kinds of ``issue`` (the text before the first colon of a reason, as the report groups
# them), each with what it breaks, as validate's Great Expectations suite says it.
ISSUES = {
    "no such file": "every row names a file under the source root",
    "no row": "every image file under the source root has a row",
    "conflicting labels": "no file is given two different labels",
    "empty label": "every row has a label",
    "empty path": "every row has a path",
    "outside the source root": "no path leads outside the source root",
    "unusable label": "every label can be a class folder's name",
}

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}


@dataclass(frozen=True)
class TableRow:
    """One row of the table as given: its number (from 1, after the header), path, label."""

    number: int
    path: str
    label: str


@dataclass(frozen=True)
class LabelRow:
    """One line of ``paths.label_rows``: a table row (or a file no row names), and its fate."""

    row: int | None
    path: str
    label: str
    raw: str = ""  # the path under paths.raw it was written to; empty when set aside
    issue: str = ""
    reason: str = ""

    def as_record(self) -> list[str]:
        return ["" if self.row is None else str(self.row), self.path, self.label, self.raw,
                self.issue, self.reason]  # fmt: skip


@dataclass(frozen=True)
class LabelledFiles:
    """What the table makes of a source root: class → its files, and every row's fate."""

    classes: dict[str, list[tuple[PurePosixPath, Path]]]
    rows: list[LabelRow]
    duplicate_rows: int
    ignored_files: int  # files that are neither images nor named by a row (a README, the table)


def read_table(path: Path, name: str, columns: LabelColumns) -> list[TableRow]:
    """The rows of a CSV, TSV or Parquet table; fails naming the file, and the columns it has
    when the configured ones are not there. Rows count from 1, after the header."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{name}: data.labels must be a .csv, .tsv or .parquet table, not {suffix or 'no suffix'!r}"
        )
    try:
        if TABLE_SUFFIXES[suffix] is None:
            found, cells = _parquet_columns(path, name, columns)
        else:
            found, cells = _text_columns(path, TABLE_SUFFIXES[suffix], columns)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure: name the file and why
        raise DataError(f"{name}: cannot read the labels table: {exc}") from exc
    missing = [
        f"{getattr(columns, key)!r} (data.label_columns.{key})"
        for key in ("path", "label")
        if getattr(columns, key) not in found
    ]
    if missing:
        raise DataError(
            f"{name}: no column {' and no column '.join(missing)}; the table's columns are "
            f"{found}. Set data.label_columns to the names of its path and label columns."
        )
    paths, labels = cells[columns.path], cells[columns.label]
    if not paths:
        raise DataError(f"{name}: the labels table has no rows")
    return [
        TableRow(i + 1, _text(p), _text(label))
        for i, (p, label) in enumerate(zip(paths, labels, strict=True))
    ]


def _text_columns(path: Path, sep: str, columns: LabelColumns) -> tuple[list[str], dict[str, list]]:
    """A CSV or TSV read as text (``007`` stays ``007``, ``NA`` stays ``NA``); a row with more
    or fewer fields than the header fails naming its line, instead of shifting the columns."""
    import warnings

    import pandas as pd  # only download with a table needs pandas

    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        frame = pd.read_csv(
            path,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            index_col=False,
            on_bad_lines="error",
        )
    found = [str(c) for c in frame.columns]
    return found, {c: frame[c].tolist() for c in (columns.path, columns.label) if c in found}


def _parquet_columns(
    path: Path, name: str, columns: LabelColumns
) -> tuple[list[str], dict[str, list]]:
    """The path and label columns of a Parquet table, as text: string columns as they are,
    integer labels as their digits (a null stays missing, never ``1.0`` or ``<NA>``); any
    other type fails naming the column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    found = list(table.column_names)
    cells = {}
    for key in ("path", "label"):
        column = getattr(columns, key)
        if column not in found:
            continue
        values = table.column(column)
        kind = values.type
        if pa.types.is_dictionary(kind):
            values, kind = values.cast(kind.value_type), kind.value_type
        if pa.types.is_integer(kind) and key == "label":
            values = pc.cast(values, pa.string())
        elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(
                f"{name}: column {column!r} (data.label_columns.{key}) holds {kind}, not text"
                + (" or integers" if key == "label" else "")
            )
        cells[column] = values.to_pylist()
    return found, cells


def _text(value: object) -> str:
    """A cell as text, NFC; a missing value (a Parquet null) is empty."""
    return "" if value is None else unicodedata.normalize("NFC", str(value))


def files_under(root: Path, links: set[str] | None = None) -> dict[str, Path]:
    """NFC relative path → file, for every regular file under ``root`` (no OS litter). Links
    are never followed: their relative paths go to ``links`` when it is given."""
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_os_litter(d))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            rel = unicodedata.normalize("NFC", path.relative_to(root).as_posix())
            if is_os_litter(rel):
                continue
            if path.is_symlink() or not path.is_file():
                if links is not None and path.is_symlink():
                    links.add(rel)
                continue
            if rel in files:
                raise DataError(
                    f"{files[rel]} and {path} have the same name after Unicode NFC normalisation"
                )
            files[rel] = path
    return files


def choose_root(chain: list[Path], rows: list[TableRow]) -> tuple[Path, dict[str, Path], set[str]]:
    """The root in ``chain`` under which the most table paths name a file (the outermost on
    a tie), with its files and its links (:func:`files_under`)."""
    best = None
    for level in chain:
        links: set[str] = set()
        files = files_under(level, links)
        hits = sum(1 for row in rows if _inside(row.path) in files)
        if best is None or hits > best[0]:
            best = (hits, level, files, links)
    assert best is not None
    return best[1], best[2], best[3]


def _inside(path: str) -> str | None:
    """The table path as a relative POSIX path inside the root, or None when it leaves it
    (absolute, a Windows drive, or up through ``..``)."""
    if not path or path.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", path):
        return None
    normal = posixpath.normpath(path.replace("\\", "/"))
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return normal


def usable_label(label: str) -> bool:
    """A label becomes a class folder's name, so it must be one that every later stage
    sees: no separators, control characters or OS-litter names, at most 255 bytes."""
    return (
        label not in (".", "..")
        and not any(c in label for c in "/\\")
        and all(c.isprintable() or c == " " for c in label)
        and not (is_os_litter(label) or is_os_litter(label + "/x"))
        and len(label.encode("utf-8")) <= 255
    )


def label_files(
    rows: list[TableRow],
    files: dict[str, Path],
    table: str,
    exclude: tuple[str, ...],
    table_file: str | None = None,
    links: frozenset[str] | set[str] = frozenset(),
) -> LabelledFiles:
    """Assign each row's file to its label; set aside every row and file that cannot be used.

    ``files`` are the root's files (:func:`files_under`); ``table`` names the table in
    reasons; ``table_file`` is the table's own path among ``files`` when it sits inside the
    root; ``links`` are the root's symbolic links, which are never followed. Rows whose
    label is in ``exclude`` are dropped, as excluded class folders are.
    """
    excluded = {unicodedata.normalize("NFC", name) for name in exclude}
    folded = {rel.casefold(): rel for rel in files}
    verdicts: dict[int, LabelRow] = {}
    by_file: dict[str, list[TableRow]] = {}
    for row in rows:
        where = f"{table} row {row.number}"
        inside = _inside(row.path)
        if not row.path.strip():
            verdicts[row.number] = _aside(row, "empty path", f"{where} has no path")
        elif inside is None:
            verdicts[row.number] = _aside(
                row,
                "outside the source root",
                f"{where} names {row.path!r}, which is not under the source root",
            )
        elif not row.label.strip():
            verdicts[row.number] = _aside(
                row, "empty label", f"{where} gives {row.path!r} no label"
            )
        elif not usable_label(row.label):
            verdicts[row.number] = _aside(
                row,
                "unusable label",
                f"{where}: {row.label!r} cannot be a class folder's name (no '/', '\\', "
                "control characters, '.', '..' or OS-litter names such as __MACOSX; at most "
                "255 bytes)",
            )
        elif inside in links:
            verdicts[row.number] = _aside(
                row,
                "no such file",
                f"{where} names {row.path!r}, a symbolic link, which is never followed",
            )
        elif inside not in files:
            near = folded.get(inside.casefold())
            hint = f" (there is {near!r}, which differs in case)" if near else ""
            verdicts[row.number] = _aside(
                row, "no such file", f"{where} names {row.path!r}: no such file in the source{hint}"
            )
        else:
            by_file.setdefault(inside, []).append(row)

    classes: dict[str, list[tuple[PurePosixPath, Path]]] = {}
    duplicates = 0
    for rel, named in by_file.items():
        labels = sorted({row.label for row in named})
        if len(labels) > 1:
            numbers = ", ".join(str(row.number) for row in named)
            for row in named:
                verdicts[row.number] = _aside(
                    row,
                    "conflicting labels",
                    f"{table} rows {numbers} give {rel!r} different labels: "
                    + ", ".join(repr(label) for label in labels),
                )
            continue
        first, *again = named
        duplicates += len(again)
        if first.label in excluded:
            for row in named:
                verdicts[row.number] = LabelRow(
                    row.number, row.path, row.label, reason="excluded by data.exclude_classes"
                )
            continue
        raw = f"{first.label}/{rel}"
        for row in named:
            verdicts[row.number] = LabelRow(row.number, row.path, row.label, raw=raw)
        classes.setdefault(first.label, []).append((PurePosixPath(rel), files[rel]))

    named_anywhere = {_inside(row.path) for row in rows}
    unnamed = []
    ignored = 0
    for rel in files:
        if rel in named_anywhere or rel == table_file:
            continue
        if PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES:
            unnamed.append(
                LabelRow(
                    None,
                    rel,
                    "",
                    issue="no row",
                    reason=f"no row: no row of {table} names this file",
                )
            )
        else:
            ignored += 1
    ignored += len(links - named_anywhere)
    label_rows = [verdicts[row.number] for row in rows if row.number in verdicts] + unnamed
    set_aside = [label_row for label_row in label_rows if label_row.issue]
    for label_row in set_aside:
        log.warning("set aside %s: %s", label_row.path or "(no path)", label_row.reason)
    if not classes:
        kinds = Counter(label_row.issue for label_row in set_aside)
        raise DataError(
            f"{table}: no row names a usable file in the source ({len(rows)} rows, "
            f"{len(files)} files); set aside: "
            + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
            + "; for example:\n"
            + "\n".join(f"  {label_row.reason}" for label_row in set_aside[:5])
        )
    _refuse_labels_that_differ_in_case(rows, set(classes), table)
    return LabelledFiles(
        {name: sorted(classes[name]) for name in sorted(classes)}, label_rows, duplicates, ignored
    )


def _aside(row: TableRow, issue: str, reason: str) -> LabelRow:
    assert issue in ISSUES, issue
    return LabelRow(row.number, row.path, row.label, issue=issue, reason=f"{issue}: {reason}")


def _refuse_labels_that_differ_in_case(rows: list[TableRow], used: set[str], table: str) -> None:
    """Two labels that differ only in case would share one class folder on macOS or Windows."""
    seen: dict[str, str] = {}
    for label in sorted(used):
        other = seen.setdefault(label.casefold(), label)
        if other != label:
            first = {lab: next(r.number for r in rows if r.label == lab) for lab in (other, label)}
            raise DataError(
                f"{table}: the labels {other!r} (row {first[other]}) and {label!r} (row "
                f"{first[label]}) differ only in case, so they would share one class folder on "
                "macOS and Windows; make them one label or two distinct names"
            )


def write_label_rows(path: Path, rows: list[LabelRow]) -> None:
    """``paths.label_rows``: a CSV of :data:`LABEL_ROW_COLUMNS` (a header only for class folders)."""
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LABEL_ROW_COLUMNS)
        writer.writerows(row.as_record() for row in rows)
