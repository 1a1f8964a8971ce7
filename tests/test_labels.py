"""Labels from a table (``data.labels``) beside the images, instead of class folders."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.sources.fetch import ChecksumError
from pipeline.stages import download, split, validate
from tests.support.httpserver import ServedFiles
from tests.support.images import create_image_folder, noise_image
from tests.support.project import manifest, params_with, raw_keys, split_rows

CLASSES = {"cat": 8, "dog": 8, "bird": 8}


def _flatten(folder: Path, dest: Path) -> list[tuple[str, str]]:
    """The images of a ``<class>/<file>`` folder in one ``dest/images/`` folder, under
    names that say nothing of their class; returns (path, label) rows."""
    (dest / "images").mkdir(parents=True)
    rows = []
    for i, image in enumerate(sorted(folder.rglob("*.png"))):
        name = f"images/{hashlib.sha256(image.as_posix().encode()).hexdigest()[:10]}_{i}.png"
        shutil.copyfile(image, dest / name)
        rows.append((name, image.parent.name))
    return rows


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("path", "label")) -> Path:
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path


def _data_stages(ws: Path, monkeypatch, **data) -> dict:
    """download, validate and split in the workspace ``ws``; their metrics."""
    ws.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(ws)
    params = params_with(data=data)
    return {
        stage.__name__.rsplit(".", 1)[-1]: stage.main(params)
        for stage in (download, validate, split)
    }


def _splits_by_sha(ws: Path) -> dict[str, tuple[str, str]]:
    """sha256 → (label, split) over the split files of ``ws``."""
    sha256_of = manifest(ws).set_index("path")["sha256"]
    table = split_rows(ws)
    return {
        sha256_of[path]: (label, name)
        for path, label, name in zip(table["path"], table["label"], table["split"], strict=True)
    }


def test_a_table_gives_the_same_images_the_same_labels_and_splits_as_class_folders(
    tmp_path, monkeypatch
):
    folders = create_image_folder(tmp_path / "folders", CLASSES)
    flat = tmp_path / "flat"
    _write_csv(tmp_path / "project_labels.csv", _flatten(folders, flat))

    by_folder = _data_stages(tmp_path / "a", monkeypatch, source=str(folders))
    # The table sits in the project, not in the source: a relative name is looked for in
    # the source first, then here.
    (tmp_path / "b").mkdir()
    shutil.copyfile(tmp_path / "project_labels.csv", tmp_path / "b" / "labels.csv")
    by_table = _data_stages(tmp_path / "b", monkeypatch, source=str(flat), labels="labels.csv")

    assert by_table["download"]["class_counts"] == by_folder["download"]["class_counts"] == CLASSES
    assert by_table["download"]["labels"]["set_aside"] == 0
    assert by_table["validate"]["images"] == by_folder["validate"]["images"] == 24
    assert by_table["validate"]["quarantined"] == 0
    same = _splits_by_sha(tmp_path / "a")
    assert len(same) == 24 and _splits_by_sha(tmp_path / "b") == same
    assert by_table["split"]["counts"] == by_folder["split"]["counts"]
    assert [split for _, split in same.values()].count("train") == by_folder["split"]["counts"][
        "train"
    ]
    rows = pd.read_csv(tmp_path / "b/data/label_rows.csv", keep_default_na=False)
    assert len(rows) == 24 and (rows["issue"] == "").all()
    assert all(
        raw == f"{label}/{path}" for raw, label, path in rows[["raw", "label", "path"]].values
    )
    # A folder source writes a header only.
    assert pd.read_csv(tmp_path / "a/data/label_rows.csv").empty


def _hostile_source(root: Path, outside: Path) -> list[tuple[str, str]]:
    """``root/images`` with good and bad rows of every kind, and a stray image with no row."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(20):
        noise_image(i).save(images / f"good_{i:02d}.png")
    noise_image(100).save(images / "twice.png")
    noise_image(101).save(images / "again.png")
    noise_image(102).save(images / "stray.png")  # no row names it
    noise_image(103).save(images / "nolabel.png")
    noise_image(104).save(images / "slashed.png")
    noise_image(105).save(images / "Cased.png")
    (root / "README.txt").write_text("not an image, and no row needs it\n")
    noise_image(106).save(outside)  # must never be read through the table
    rows = [(f"images/good_{i:02d}.png", ("cat", "dog")[i % 2]) for i in range(20)]
    rows += [
        ("images/gone.png", "cat"),  # 21: no such file
        ("images/twice.png", "cat"),  # 22 and 23: two labels for one file
        ("images/twice.png", "dog"),
        ("images/again.png", "dog"),  # 24 and 25: the same label twice is one row's worth
        ("./images/again.png", "dog"),
        ("images/nolabel.png", "  "),  # 26: an empty label
        ("../" + outside.name, "cat"),  # 27: outside the root
        ("/etc/hostname", "cat"),  # 28: absolute
        ("images/slashed.png", "cat/kitten"),  # 29: not a folder name
        ("images/cased.png", "cat"),  # 30: the file is Cased.png
        ("", "dog"),  # 31: no path
    ]
    return rows


def test_every_bad_row_and_unlisted_image_is_quarantined_with_its_reason(workspace, tmp_path):
    source = tmp_path / "ds"
    rows = _hostile_source(source, tmp_path / "outside.png")
    _write_csv(source / "labels.csv", rows)
    params = workspace(
        data={"source": str(source), "labels": "labels.csv"}, validate={"min_images_per_class": 5}
    )
    fetched = download.main(params)
    checked = validate.main(params)

    raw = raw_keys()
    assert raw == {f"{('cat', 'dog')[i % 2]}/images/good_{i:02d}.png" for i in range(20)} | {
        "dog/images/again.png"
    }
    issues = {
        "no such file": 2,  # gone.png, cased.png
        "conflicting labels": 2,
        "empty label": 1,
        "outside the source root": 2,
        "unusable label": 1,
        "empty path": 1,
        "no row": 2,  # stray.png, and Cased.png, which only a miscased row names
    }
    assert fetched["labels"] == {
        "table": "labels.csv",
        "rows": 31,
        "duplicate_rows": 1,
        "set_aside": 11,
        "set_aside_by_issue": dict(sorted(issues.items())),
        "ignored_files": 1,  # README.txt; the table itself is not counted
    }
    # Every row of the table, and the stray image, has its verdict.
    verdicts = pd.read_csv("data/label_rows.csv", dtype=str, keep_default_na=False)
    assert verdicts["row"].tolist() == [str(n) for n in range(1, 32)] + ["", ""]
    assert set(verdicts.loc[verdicts["issue"] == "", "raw"]) >= {"dog/images/again.png"}

    quarantine = pd.read_csv("metrics/quarantine.csv", dtype=str, keep_default_na=False)
    reasons = dict(zip(quarantine["path"], quarantine["reason"], strict=False))
    assert len(quarantine) == 11 and checked["quarantined"] == 11
    assert checked["set_aside_by_labels"] == 11 and checked["images"] == 21
    assert reasons["images/gone.png"] == (
        "no such file: labels.csv row 21 names 'images/gone.png': no such file in the source"
    )
    assert reasons["images/cased.png"].endswith(
        "(there is 'images/Cased.png', which differs in case)"
    )
    assert reasons["images/twice.png"] == (
        "conflicting labels: labels.csv rows 22, 23 give 'images/twice.png' different labels: "
        "'cat', 'dog'"
    )
    assert reasons["images/nolabel.png"].startswith("empty label: labels.csv row 26")
    assert reasons["../outside.png"].startswith("outside the source root: labels.csv row 27")
    assert reasons["/etc/hostname"].startswith("outside the source root: labels.csv row 28")
    assert reasons["images/slashed.png"].startswith(
        "unusable label: labels.csv row 29: 'cat/kitten'"
    )
    assert reasons[""] == "empty path: labels.csv row 31 has no path"
    assert reasons["images/stray.png"] == "no row: no row of labels.csv names this file"

    # The suite reports each kind of bad row, softly: the rows are quarantined, not fatal.
    checks = {
        c["describe"]: c for c in checked["expectations"]["checks"] if c["table"] == "label_rows"
    }
    assert len(checks) == 7 and not any(c["hard"] for c in checks.values())
    failed = {
        d.split(": ", 1)[1].split(" (")[0]: c["unexpected_count"]
        for d, c in checks.items()
        if not c["success"]
    }
    assert failed == {
        "every row names a file under the source root": 2,
        "every image file under the source root has a row": 2,
        "no file is given two different labels": 2,
        "every row has a label": 1,
        "every row has a path": 1,
        "no path leads outside the source root": 2,
        "every label can be a class folder's name": 1,
    }
    assert checked["expectations"]["success"]
    named = checks[
        "data.labels: every row names a file under the source root (rows that are not are quarantined)"
    ]
    assert named["offending"] == ["images/gone.png (row 21)", "images/cased.png (row 30)"]


@pytest.mark.parametrize(
    ("table", "body", "message"),
    [
        (
            "labels.csv",
            "file,class\nimages/a.png,cat\n",
            "labels.csv: no column 'path' (data.label_columns.path) and no column 'label' "
            "(data.label_columns.label); the table's columns are ['file', 'class']",
        ),
        ("labels.csv", "path,label\n", "labels.csv: the labels table has no rows"),
        ("labels.parquet", "not parquet at all", "labels.parquet: cannot read the labels table"),
        ("labels.json", "{}", "data.labels must be a .csv, .tsv or .parquet table, not '.json'"),
        ("missing.csv", None, "data.labels: 'missing.csv' not found"),
    ],
)
def test_a_table_that_cannot_be_read_fails_naming_it_and_keeps_the_last_good_data(
    workspace, tmp_path, table, body, message
):
    source = tmp_path / "ds"
    _write_csv(source / "good.csv", _flatten(create_image_folder(tmp_path / "f", CLASSES), source))
    download.main(workspace(data={"source": str(source), "labels": "good.csv"}))
    before = sorted(p.as_posix() for p in Path("data/raw").rglob("*"))
    if body is not None:
        (source / table).write_text(body)
    with pytest.raises(DataError) as info:
        download.main(workspace(data={"source": str(source), "labels": table}))
    assert message in str(info.value)
    assert sorted(p.as_posix() for p in Path("data/raw").rglob("*")) == before
    assert not [p for p in Path("data").iterdir() if p.name.startswith(".")]  # no temp left


def test_labels_that_differ_only_in_case_fail_naming_both(workspace, tmp_path):
    source = tmp_path / "ds"
    rows = _flatten(create_image_folder(tmp_path / "f", CLASSES), source)
    rows[3] = (rows[3][0], rows[3][1].upper())
    _write_csv(source / "labels.csv", rows)
    with pytest.raises(DataError) as info:
        download.main(workspace(data={"source": str(source), "labels": "labels.csv"}))
    upper = rows[3][1]
    first = next(i + 1 for i, (_, lab) in enumerate(rows) if lab == upper.lower())
    assert (
        f"the labels {upper!r} (row 4) and {upper.lower()!r} (row {first}) differ only in case"
        in str(info.value)
        or f"the labels {upper.lower()!r} (row {first}) and {upper!r} (row 4)" in str(info.value)
    )
    assert not Path("data/raw").exists()


def test_an_archive_ships_a_parquet_table_in_its_top_folder(workspace, tmp_path):
    """The table is found inside the archive's single top folder, read with configured column
    names, and labels the images in any layout; excluded labels drop like excluded folders."""
    ds = tmp_path / "release-1.0"
    rows = _flatten(create_image_folder(tmp_path / "f", CLASSES), ds / "data")
    pd.DataFrame(
        {"filename": [f"data/{p}" for p, _ in rows], "species": [lab for _, lab in rows]}
    ).to_parquet(ds / "meta.parquet")
    archive = tmp_path / "release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(ds, arcname="release-1.0")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    summary = download.main(
        workspace(
            data={
                "source": str(archive),
                "sha256": digest,
                "labels": "meta.parquet",
                "label_columns": {"path": "filename", "label": "species"},
                "exclude_classes": ["bird"],
            }
        )
    )
    assert summary["class_counts"] == {"cat": 8, "dog": 8}
    assert summary["labels"]["set_aside"] == 0 and summary["labels"]["ignored_files"] == 0
    raw = raw_keys()
    assert {r.split("/", 1)[0] for r in raw} == {"cat", "dog"} and len(raw) == 16
    assert all(r.split("/", 1)[1].startswith("data/images/") for r in raw)
    verdicts = pd.read_csv("data/label_rows.csv", dtype=str, keep_default_na=False)
    assert (
        verdicts.loc[verdicts["label"] == "bird", "reason"] == "excluded by data.exclude_classes"
    ).sum() == 8


def test_a_table_by_url_is_fetched_and_checked_against_its_sha256(workspace, tmp_path):
    source = tmp_path / "ds"
    rows = _flatten(create_image_folder(tmp_path / "f", CLASSES), source)
    body = _write_csv(tmp_path / "served.csv", rows).read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    with ServedFiles({"/v1/labels.csv": body}) as server:
        url = server.url("/v1/labels.csv")
        with pytest.raises(
            ConfigError, match="data.labels_sha256 is required for a remote labels table"
        ):
            download.main(workspace(data={"source": str(source), "labels": url}))
        with pytest.raises(ChecksumError):
            download.main(
                workspace(data={"source": str(source), "labels": url, "labels_sha256": "0" * 64})
            )
        summary = download.main(
            workspace(data={"source": str(source), "labels": url, "labels_sha256": digest})
        )
    assert summary["class_counts"] == CLASSES and summary["labels"]["table"] == url
    # A local table is checked against labels_sha256 too.
    (source / "labels.csv").write_bytes(body + b"images/x.png,cat\n")
    with pytest.raises(ChecksumError, match="data.labels_sha256 mismatch"):
        download.main(
            workspace(data={"source": str(source), "labels": "labels.csv", "labels_sha256": digest})
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"labels_sha256": "a" * 64}, "data.labels_sha256 is set but data.labels is null"),
        ({"labels": "t.csv", "labels_sha256": "xyz"}, "data.labels_sha256 must be 64 hex digits"),
        (
            {"labels": "t.csv", "label_columns": {"path": "f", "label": "f"}},
            "path and label are both 'f'",
        ),
        (
            {"labels": "t.csv", "label_columns": "path,label"},
            "data.label_columns must be a mapping",
        ),
    ],
)
def test_label_params_are_checked_when_read(data, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        params_with(data=data)


def test_parquet_labels_are_text_and_a_null_label_is_empty(workspace, tmp_path):
    """Integer labels keep their digits (no ``1.0`` because a null made the column float, no
    ``<NA>`` class); a null label is an empty label; a path column that is not text fails."""
    source = tmp_path / "ds"
    rows = _flatten(create_image_folder(tmp_path / "f", CLASSES), source)
    codes = {"bird": 1, "cat": 2, "dog": 3}
    labels = pd.array([codes[lab] for _, lab in rows], dtype="Int64")
    labels[0] = pd.NA
    pd.DataFrame({"path": [p for p, _ in rows], "label": labels}).to_parquet(source / "t.parquet")
    summary = download.main(workspace(data={"source": str(source), "labels": "t.parquet"}))
    assert summary["class_counts"] == {"1": 7, "2": 8, "3": 8}
    assert summary["labels"]["set_aside_by_issue"] == {"empty label": 1}
    pd.DataFrame({"path": range(len(rows)), "label": ["x"] * len(rows)}).to_parquet(
        source / "bad.parquet"
    )
    with pytest.raises(
        DataError,
        match=r"bad.parquet: column 'path' \(data.label_columns.path\) holds int64, not text",
    ):
        download.main(workspace(data={"source": str(source), "labels": "bad.parquet"}))


def test_a_csv_line_with_an_extra_field_fails_instead_of_shifting_the_columns(workspace, tmp_path):
    source = tmp_path / "ds"
    rows = _flatten(create_image_folder(tmp_path / "f", CLASSES), source)
    lines = ["path,label", *(f"{p},{lab}" for p, lab in rows)]
    lines[3] += ",oops"
    (source / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"labels.csv: cannot read the labels table: .*line 4"):
        download.main(workspace(data={"source": str(source), "labels": "labels.csv"}))


def test_windows_paths_litter_labels_and_links(workspace, tmp_path):
    """Backslashes read as separators; a label validate would skip as OS litter is
    quarantined, not lost; a link is named as one and never followed."""
    source = tmp_path / "ds"
    rows = _flatten(create_image_folder(tmp_path / "f", CLASSES), source)
    noise_image(900).save(tmp_path / "secret.png")
    (source / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    table = [(p.replace("/", "\\"), lab) for p, lab in rows[:-1]]
    table += [(rows[-1][0], "__MACOSX"), ("images/link.png", "cat"), ("C:\\x.png", "cat")]
    _write_csv(source / "labels.csv", table)
    summary = download.main(workspace(data={"source": str(source), "labels": "labels.csv"}))
    assert sum(summary["class_counts"].values()) == 23
    verdicts = pd.read_csv("data/label_rows.csv", dtype=str, keep_default_na=False)
    reasons = dict(zip(verdicts["path"], verdicts["reason"], strict=True))
    assert reasons[rows[-1][0]].startswith("unusable label: labels.csv row 24: '__MACOSX'")
    assert reasons["images/link.png"] == (
        "no such file: labels.csv row 25 names 'images/link.png', a symbolic link, which is "
        "never followed"
    )
    assert reasons["C:\\x.png"].startswith("outside the source root: labels.csv row 26")
    assert not [key for key in raw_keys() if key.endswith("link.png")]


def test_when_no_row_is_usable_the_error_says_why(workspace, tmp_path):
    source = tmp_path / "ds"
    rows = _flatten(create_image_folder(tmp_path / "f", CLASSES), source)
    _write_csv(source / "labels.csv", [(f"pics/{p}", lab) for p, lab in rows])
    with pytest.raises(DataError) as info:
        download.main(workspace(data={"source": str(source), "labels": "labels.csv"}))
    message = str(info.value)
    assert "labels.csv: no row names a usable file in the source (24 rows, 25 files)" in message
    assert "set aside: 24 no such file, 24 no row; for example:" in message
    assert "no such file: labels.csv row 1 names 'pics/images/" in message


def test_a_labels_table_is_part_of_what_names_a_dataset():
    """Labels from a table (or another table) are a new dataset for the class-change guard;
    a folder dataset's identity is what it was before tables existed, so its accepted
    classes still apply."""
    folders = params_with(data={"source": "/data/x"}).data
    table = params_with(data={"source": "/data/x", "labels": "t.csv"}).data
    assert validate.dataset_identity(folders) == {"source": "/data/x", "member": None}
    assert validate.dataset_identity(table) == {
        "source": "/data/x",
        "member": None,
        "labels": "t.csv",
    }
    accepted = validate.AcceptedClasses(["a", "b"], validate.dataset_identity(folders))
    validate.check_class_change(accepted, ["c"], validate.dataset_identity(table), False, Path("x"))
    with pytest.raises(DataError, match="the classes differ"):
        validate.check_class_change(
            accepted, ["c"], validate.dataset_identity(folders), False, Path("x")
        )
