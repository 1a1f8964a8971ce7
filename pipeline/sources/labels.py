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
import unicodedata
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
    when the configured ones are not there."""
    import pandas as pd  # only download with a table needs pandas

    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"{name}: data.labels must be a .csv, .tsv or .parquet table, not {suffix or 'no suffix'!r}"
        )
    try:
        if TABLE_SUFFIXES[suffix] is None:
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(
                path,
                sep=TABLE_SUFFIXES[suffix],
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
            )
    except Exception as exc:  # noqa: BLE001 - any parser failure: name the file and why
        raise DataError(f"{name}: cannot read the labels table: {exc}") from exc
    found = [str(c) for c in frame.columns]
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
    if frame.empty:
        raise DataError(f"{name}: the labels table has no rows")
    return [
        TableRow(i + 1, _text(p), _text(label))
        for i, (p, label) in enumerate(zip(frame[columns.path], frame[columns.label], strict=True))
    ]


def _text(value: object) -> str:
    """A cell as text: NFC, with a missing value (Parquet null, NaN) as empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return unicodedata.normalize("NFC", str(value))


def root_chain(top: Path) -> list[Path]:
    """``top`` and each lone folder under it: the roots the table's paths may be relative to
    (an archive's single top folder, and any lone folders below it)."""
    chain = [top]
    while len(entries := _entries(chain[-1])) == 1 and entries[0].is_dir():
        chain.append(entries[0])
    return chain


def _entries(folder: Path) -> list[Path]:
    return [e for e in folder.iterdir() if not is_os_litter(e.name)]


def files_under(root: Path) -> dict[str, Path]:
    """NFC relative path → file, for every regular file under ``root`` (no OS litter, no links)."""
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_os_litter(d))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            rel = unicodedata.normalize("NFC", path.relative_to(root).as_posix())
            if is_os_litter(rel) or path.is_symlink() or not path.is_file():
                continue
            if rel in files:
                raise DataError(
                    f"{files[rel]} and {path} have the same name after Unicode NFC normalisation"
                )
            files[rel] = path
    return files


def choose_root(chain: list[Path], rows: list[TableRow]) -> tuple[Path, dict[str, Path]]:
    """The root in ``chain`` under which the most table paths name a file (the outermost on
    a tie), with its files."""
    best: tuple[int, Path, dict[str, Path]] | None = None
    for level in chain:
        files = files_under(level)
        hits = sum(1 for row in rows if _inside(row.path) in files)
        if best is None or hits > best[0]:
            best = (hits, level, files)
    assert best is not None
    return best[1], best[2]


def _inside(path: str) -> str | None:
    """The table path as a relative POSIX path inside the root, or None when it leaves it."""
    if not path or path.startswith("/") or PurePosixPath(path).is_absolute():
        return None
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return normal


def usable_label(label: str) -> bool:
    """A label becomes a class folder's name, so it must be one."""
    return label not in (".", "..") and not any(c in label for c in "/\\\0")


def label_files(
    rows: list[TableRow],
    files: dict[str, Path],
    table: str,
    exclude: tuple[str, ...],
    table_file: str | None = None,
) -> LabelledFiles:
    """Assign each row's file to its label; set aside every row and file that cannot be used.

    ``files`` are the root's files (:func:`files_under`); ``table`` names the table in
    reasons; ``table_file`` is the table's own path among ``files`` when it sits inside the
    root. Rows whose label is in ``exclude`` are dropped, as excluded class folders are.
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
                f"{where}: {row.label!r} cannot be a class folder's name (no '/', '\\', NUL, "
                "'.' or '..')",
            )
        elif inside not in files:
            near = folded.get(inside.casefold())
            hint = f" (there is {near!r}, which differs in case)" if near else ""
            verdicts[row.number] = _aside(
                row,
                "no such file",
                f"{where} names {row.path!r}, which is not under the source root{hint}",
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
    _refuse_labels_that_differ_in_case(rows, set(classes), table)

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
    label_rows = [verdicts[row.number] for row in rows if row.number in verdicts] + unnamed
    for label_row in label_rows:
        if label_row.issue:
            log.warning("set aside %s: %s", label_row.path or "(no path)", label_row.reason)
    if not classes:
        raise DataError(
            f"{table}: no row names a usable file under the source root "
            f"({len(rows)} rows, {len(files)} files); see the reasons above"
        )
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
