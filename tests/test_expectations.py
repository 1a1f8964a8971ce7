"""Tests for pipeline.data.expectations: real GX Core runs on tiny in-memory tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.expectations import Check, SuiteResult, format_failures, run_suite


def _manifest(**overrides: list) -> pd.DataFrame:
    data = {
        "path": ["cat/a.png", "cat/b.png", "dog/a.png", "dog/b.png", "dog/c.png"],
        "label": ["cat", "cat", "dog", "dog", "dog"],
        "folder": ["cat", "cat", "dog", "dog", "dog"],
        "width": [32, 40, 64, 32, 48],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def _class_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.groupby("label").size().rename("n").reset_index()


MANIFEST_CHECKS = [
    Check("ExpectColumnValuesToNotBeNull", {"column": "path"}, describe="every row has a path"),
    Check("ExpectColumnValuesToBeUnique", {"column": "path"}, describe="paths are unique"),
    Check(
        "ExpectColumnValuesToBeInSet",
        {"column": "label", "value_set": ["cat", "dog"]},
        describe="labels are known classes",
    ),
    Check(
        "ExpectColumnValuesToBeBetween",
        {"column": "width", "min_value": 16, "max_value": 4096},
        describe="images are at least 16 px wide",
    ),
    Check(
        "ExpectColumnPairValuesToBeEqual",
        {"column_A": "label", "column_B": "folder"},
        describe="label matches its folder",
    ),
]
COUNT_CHECKS = [
    Check(
        "ExpectColumnValuesToBeBetween",
        {"column": "n", "min_value": 2},
        describe="every class has at least 2 images",
    ),
    Check("ExpectTableRowCountToBeBetween", {"min_value": 2}, describe="at least 2 classes"),
]


def _run(manifest: pd.DataFrame, manifest_checks=None, count_checks=None, **kw) -> SuiteResult:
    return run_suite(
        "validate",
        {"manifest": manifest, "class_counts": _class_counts(manifest)},
        {
            "manifest": MANIFEST_CHECKS if manifest_checks is None else manifest_checks,
            "class_counts": COUNT_CHECKS if count_checks is None else count_checks,
        },
        **kw,
    )


def test_passing_suite_reports_every_check_in_order() -> None:
    result = _run(_manifest())

    assert result.success
    assert result.failures() == []
    assert [r.check for r in result.results] == MANIFEST_CHECKS + COUNT_CHECKS
    assert all(r.success for r in result.results)
    assert result.results[-1].observed == 2  # table row count
    summary = result.summary()
    json.dumps(summary)  # JSON-able as promised
    assert summary["evaluated"] == summary["passed"] == 7
    assert summary["checks"][4]["column"] == "label, folder"
    assert "all hard checks passed" in format_failures(result)


def test_failing_hard_check_names_offending_values() -> None:
    manifest = _manifest(
        path=["cat/a.png", "cat/a.png", "dog/a.png", "dog/b.png", "dog/c.png"],
        label=["cat", "cat", "zebra", "dog", "dog"],
    )
    result = _run(manifest)

    assert not result.success
    failed = {r.check.describe: r for r in result.failures()}
    assert set(failed) == {
        "paths are unique",
        "labels are known classes",
        "label matches its folder",
        "every class has at least 2 images",  # zebra has one, in the derived table
    }
    assert failed["labels are known classes"].offending == ["zebra"]
    assert failed["labels are known classes"].rows == [2]
    assert failed["label matches its folder"].offending == [["zebra", "dog"]]
    message = format_failures(result)
    assert "labels are known classes" in message
    assert "column 'label'" in message
    assert "'zebra'" in message
    assert "'cat/a.png'" in message
    assert "table 'manifest'" in message


def test_failing_soft_check_is_reported_but_keeps_success() -> None:
    soft = Check(
        "ExpectColumnValuesToBeBetween",
        {"column": "n", "min_value": 3},
        hard=False,
        describe="classes have at least 3 images",
    )
    result = _run(_manifest(), count_checks=[soft])

    assert result.success
    assert result.failures() == []
    (soft_failure,) = result.failures(hard_only=False)
    assert soft_failure.check is soft
    assert soft_failure.offending == [2]
    assert result.summary()["failed_soft"] == 1
    assert "classes have at least 3 images" not in format_failures(result)


def test_null_failure_reports_rows_not_nan_values() -> None:
    result = _run(_manifest(path=["cat/a.png", None, "dog/a.png", "dog/b.png", "dog/c.png"]))

    (failure,) = result.failures()
    assert failure.check.expectation == "ExpectColumnValuesToNotBeNull"
    assert failure.offending == [None]
    assert failure.rows == [1]
    message = format_failures(result)
    assert "rows: [1]" in message
    assert "nan" not in message.lower()


def test_check_on_missing_column_blocks_even_when_soft() -> None:
    typo = Check("ExpectColumnValuesToNotBeNull", {"column": "pth"}, hard=False)
    result = _run(_manifest(), manifest_checks=[typo], count_checks=[])

    assert not result.success
    (failure,) = result.failures()
    assert failure.error is not None and "pth" in failure.error
    assert "could not run" in format_failures(result)


def test_unknown_expectation_names_close_matches() -> None:
    bad = Check("ExpectColumnValuesToNotBeNul", {"column": "path"})
    with pytest.raises(ValueError, match="ExpectColumnValuesToNotBeNull"):
        _run(_manifest(), manifest_checks=[bad])


def test_bad_kwargs_name_the_check() -> None:
    bad = Check("ExpectColumnValuesToBeInSet", {"column": "label"})  # no value_set
    with pytest.raises(ValueError, match="ExpectColumnValuesToBeInSet"):
        _run(_manifest(), manifest_checks=[bad])


def test_bad_check_leaves_existing_docs_alone(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.html").write_text("previous run")
    bad = Check("ExpectNothing", {})
    with pytest.raises(ValueError, match="ExpectNothing"):
        _run(_manifest(), manifest_checks=[bad], docs_dir=docs)
    assert (docs / "index.html").read_text() == "previous run"


def test_checks_for_a_table_without_frame_fail_fast() -> None:
    with pytest.raises(ValueError, match="class_counts"):
        run_suite("validate", {"manifest": _manifest()}, {"class_counts": COUNT_CHECKS})


def test_docs_replace_folder_and_leave_no_gx_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "reports" / "validation"
    docs.mkdir(parents=True)
    (docs / "stale.html").write_text("old run")

    result = _run(_manifest(label=["cat", "cat", "zebra", "dog", "dog"]), docs_dir=docs)

    assert not result.success  # docs are written for failing runs too
    assert (docs / "index.html").is_file()
    assert not (docs / "stale.html").exists()
    assert list(docs.rglob("validations/**/*.html"))
    assert "labels are known classes" in "".join(
        p.read_text(encoding="utf-8") for p in docs.rglob("*.html")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # no gx/, no litter
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["validation"]
