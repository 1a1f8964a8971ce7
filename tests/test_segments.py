"""Segmented tables: a run writes the rows that changed, and reads give the table written."""

from __future__ import annotations

import logging
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.data import segments
from pipeline.data.segments import read_table, segment_files, write_table
from pipeline.errors import DataError
from pipeline.system.fsutil import atomic_path
from tests.support.images import colour_images
from tests.support.prefect import make_repo
from tests.support.project import REPO_ROOT, dvc, manifest, split_rows


def _table(n: int, start: int = 0) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "path": [f"c{i % 3}/{i:05d}.jpg" for i in range(start, start + n)],
            "label": [f"c{i % 3}" for i in range(start, start + n)],
            "width": pd.array([i if i % 7 else None for i in range(start, start + n)], "Int64"),
            "decodable": [i % 5 != 0 for i in range(start, start + n)],
            "reason": pd.array(
                [None if i % 5 else "truncated" for i in range(start, start + n)], "str"
            ),
        }
    )
    return table.sample(frac=1, random_state=n).reset_index(drop=True)  # any order in


def _write(table: pd.DataFrame, folder, previous=None) -> segments.TableWritten:
    """Write as a stage does: into a temporary folder, renamed onto ``folder``."""
    with atomic_path(folder) as tmp:
        return write_table(table, tmp, "path", previous)


def pq_rows(file) -> int:
    return pq.ParquetFile(file).metadata.num_rows


def _expected(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values("path").reset_index(drop=True)


def test_a_table_reads_back_as_written_sorted_by_key(tmp_path):
    table = _table(50)
    written = _write(table, tmp_path / "t")
    assert written == segments.TableWritten(segments=1, rows_written=50, compacted=True)
    back = read_table(tmp_path / "t", "path")
    pd.testing.assert_frame_equal(back, _expected(table))
    assert back["width"].isna().sum() == 8 and back["reason"].isna().sum() == 40


def test_growth_writes_only_the_new_rows_and_links_the_old_segment(tmp_path):
    folder = tmp_path / "t"
    _write(_table(100), folder)
    base = segment_files(folder)[0]
    inode = base.stat().st_ino
    grown = pd.concat([_table(100), _table(3, start=100)], ignore_index=True)
    written = _write(grown, folder, previous=folder)
    assert written == segments.TableWritten(segments=2, rows_written=3, compacted=False)
    files = segment_files(folder)
    assert [f.name for f in files] == ["part-000000.parquet", "part-000001.parquet"]
    assert files[0].stat().st_ino == inode  # linked, not written again
    assert pd.read_parquet(files[1])["path"].tolist() == [
        "c0/00102.jpg",
        "c1/00100.jpg",
        "c2/00101.jpg",
    ]
    pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(grown))


def test_changed_and_removed_rows_override_the_older_segments(tmp_path):
    folder = tmp_path / "t"
    table = _table(100)
    _write(table, folder)
    changed = table.copy()
    changed.loc[changed["path"] == "c1/00004.jpg", "label"] = "c0"  # a changed row
    changed.loc[changed["path"] == "c0/00006.jpg", "width"] = pd.NA  # a value now missing
    changed = changed[changed["path"] != "c2/00011.jpg"]  # a removed row
    written = _write(changed, folder, previous=folder)
    assert written.rows_written == 3 and written.segments == 2
    delta = pd.read_parquet(segment_files(folder)[1])
    assert delta.set_index("path")[segments.DELETED].to_dict() == {
        "c0/00006.jpg": False,
        "c1/00004.jpg": False,
        "c2/00011.jpg": True,
    }
    pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(changed))
    # a removed row that comes back is live again
    _write(table, folder, previous=folder)
    pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(table))


def test_an_unchanged_table_keeps_its_segments(tmp_path):
    folder = tmp_path / "t"
    _write(_table(40), folder)
    _write(pd.concat([_table(40), _table(2, start=40)]), folder, previous=folder)
    before = {f.name: f.read_bytes() for f in segment_files(folder)}
    written = _write(pd.concat([_table(2, start=40), _table(40)]), folder, previous=folder)
    assert written.rows_written == 0
    assert {f.name: f.read_bytes() for f in segment_files(folder)} == before


def test_growth_merges_the_smallest_pair_and_a_rewrite_writes_a_base(tmp_path, monkeypatch):
    """What a run writes stays bounded by what changed: past MAX_SEGMENTS the two adjacent
    later segments with the fewest rows are merged, never the whole table; the base is
    written again only when overridden rows outnumber the live ones."""
    monkeypatch.setattr(segments, "MAX_SEGMENTS", 4)
    folder = tmp_path / "t"
    table = _table(100)
    _write(table, folder)
    base = segment_files(folder)[0].stat().st_ino
    sizes = [2, 3, 1, 5, 1]
    start = 100
    for size in sizes:
        table = pd.concat([table, _table(size, start=start)])
        start += size
        written = _write(table, folder, previous=folder)
        pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(table))
    # [100, 2, 3, 1, 5]: (3, 1) merged → [100, 2, 4, 5]; + 1: (2, 4) merged → [100, 6, 5, 1]
    assert [pq_rows(f) for f in segment_files(folder)] == [100, 6, 5, 1]
    assert written == segments.TableWritten(segments=4, rows_written=1 + 6, compacted=False)
    assert segment_files(folder)[0].stat().st_ino == base  # the base never written again

    reseeded = table.assign(label="x")  # every row changed: overridden rows outnumber live
    written = _write(reseeded, folder, previous=folder)
    assert written == segments.TableWritten(segments=1, rows_written=len(table), compacted=True)
    pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(reseeded))


def test_a_change_undone_gives_back_the_segments_of_before(tmp_path):
    """A → B → A leaves A's folder byte for byte (same files), so DVC sees the output, and
    every stage after it, as they were after A."""
    folder = tmp_path / "t"
    a = _table(50)
    _write(a, folder)
    _write(pd.concat([a, _table(2, start=50)]), folder, previous=folder)
    state_a = {f.name: f.read_bytes() for f in segment_files(folder)}
    moved = a.copy()
    moved.loc[moved["path"] == "c1/00004.jpg", "label"] = "c2"
    b = pd.concat([moved, _table(2, start=50)]).iloc[3:]  # a change and 3 rows removed
    _write(b, folder, previous=folder)
    assert len(segment_files(folder)) == 3
    written = _write(pd.concat([a, _table(2, start=50)]), folder, previous=folder)
    assert written == segments.TableWritten(segments=2, rows_written=0, compacted=False)
    assert {f.name: f.read_bytes() for f in segment_files(folder)} == state_a


def test_a_table_that_was_empty_takes_rows(tmp_path):
    folder = tmp_path / "t"
    _write(_table(5).iloc[:0], folder)
    written = _write(_table(5), folder, previous=folder)
    assert written.rows_written == 5
    pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(_table(5)))


def test_a_column_empty_at_first_takes_values_later(tmp_path):
    """A column with no value yet is text, so its first value (a first broken image's
    reason) joins the kept segments instead of rewriting the table."""
    folder = tmp_path / "t"
    first = _table(20).assign(reason=None)  # no reason yet
    _write(first, folder)
    later = pd.concat([first, _table(1, start=20).assign(reason="truncated")])
    written = _write(later, folder, previous=folder)
    assert (written.compacted, written.rows_written) == (False, 1)
    reasons = read_table(folder, "path").set_index("path")["reason"]
    assert reasons.notna().sum() == 1 and reasons["c2/00020.jpg"] == "truncated"
    # and a new segment whose column is all empty joins segments where it is text
    latest = pd.concat([later, _table(1, start=21).assign(reason=None)])
    assert not _write(latest, folder, previous=folder).compacted
    reasons = read_table(folder, "path").set_index("path")["reason"]
    assert reasons.notna().sum() == 1 and reasons.isna()["c0/00021.jpg"]


def test_a_new_column_or_type_writes_the_table_anew(tmp_path):
    folder = tmp_path / "t"
    _write(_table(30), folder)
    wider = _table(30).assign(height=1)
    assert _write(wider, folder, previous=folder).compacted
    pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(wider))


def test_an_unreadable_previous_table_is_not_reused(tmp_path, caplog):
    folder = tmp_path / "t"
    _write(_table(30), folder)
    _write(_table(31), folder, previous=folder)
    segment_files(folder)[1].write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING):
        written = _write(_table(32), folder, previous=folder)
    assert written.compacted and "part-000001.parquet: not a readable table segment" in caplog.text
    pd.testing.assert_frame_equal(read_table(folder, "path"), _expected(_table(32)))


def test_bad_tables_are_one_line_errors(tmp_path):
    table = _table(5)
    with pytest.raises(DataError, match=r"^path 'c0/00000.jpg' is in the table twice$"):
        write_table(
            pd.concat([table, table.iloc[[table["path"].tolist().index("c0/00000.jpg")]]]),
            tmp_path / "a",
            "path",
        )
    with pytest.raises(DataError, match=r"holds no table"):
        read_table(tmp_path / "missing", "path")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "part-000000.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"part-000000.parquet: not a readable table segment"):
        read_table(tmp_path / "b", "path")


def test_the_table_command_prints_the_live_rows_as_csv(tmp_path, capsys):
    from pipeline.__main__ import main

    folder = tmp_path / "t"
    _write(_table(6), folder)
    _write(_table(5), folder, previous=folder)  # the sixth row removed
    assert main(["table", str(folder)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "path,label,width,decodable,reason"
    assert [line.split(",")[0] for line in printed[1:]] == sorted(_table(5)["path"])
    assert main(["table", str(tmp_path / "none")]) == 1
    assert "holds no table" in capsys.readouterr().err


def test_the_table_command_stops_quietly_when_its_reader_does(tmp_path):
    """``python -m pipeline table data/splits | head``: no traceback for the closed pipe."""
    folder = tmp_path / "t"
    _write(_table(20_000), folder)
    done = subprocess.run(
        f"{sys.executable} -m pipeline table {folder} | head -2",
        shell=True,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    assert done.stdout.splitlines() == [
        "path,label,width,decodable,reason",
        "c0/00000.jpg,c0,,False,truncated",
    ]
    assert done.stderr == ""


def _files(folder) -> set[tuple[str, int]]:
    return {(p.name, p.stat().st_ino) for p in folder.iterdir()}


@pytest.mark.slow
def test_validate_and_split_add_a_segment_when_the_data_grows(tmp_path):
    """Through ``dvc repro``: the manifest and the split table are persisted, so DVC leaves
    the last run's segments for the stages to keep (the same inodes) and each writes one
    new segment; what they read back is the whole grown table."""
    images = colour_images(tmp_path / "images", per_class=10)
    repo = make_repo(tmp_path / "repo", images)
    dvc(repo, "repro", "split")
    tables = {"manifest": repo / "data/manifest", "splits": repo / "data/splits"}
    before = {name: _files(folder) for name, folder in tables.items()}
    colour_images(images, per_class=3, start=10, classes=("red",))
    dvc(repo, "repro", "split")
    new_paths = {f"data/raw/red/{p.name}" for p in (images / "red").glob("img_1[0-2].png")}
    assert len(new_paths) == 3
    for name, folder in tables.items():
        after = _files(folder)
        assert before[name] < after, name  # the last run's segments, kept as they were
        ((segment, _),) = after - before[name]
        delta = pd.read_parquet(folder / segment)
        assert new_paths <= set(delta["path"]) and len(delta) < 10, (name, delta["path"])
    assert set(manifest(repo)["path"]) >= new_paths and len(manifest(repo)) == 33
    assert len(split_rows(repo)) == 33
