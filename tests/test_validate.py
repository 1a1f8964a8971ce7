from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.data.rawstore import RawStore
from pipeline.errors import DataError
from pipeline.stages import download, validate
from tests.support.images import noise_image
from tests.support.project import manifest as read_manifest


def _prepare(make_params, source: Path, **validate_params):
    params = make_params(data={"source": str(source)}, validate=validate_params)
    download.main(params)
    return params


def test_unusual_and_broken_files(workspace, tiny_imagefolder):
    cat = tiny_imagefolder / "cat"
    noise_image(1, mode="CMYK").save(cat / "cmyk.jpg")
    noise_image(2, mode="P").save(cat / "palette.png")
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.txt").write_text("not an image")
    (cat / "cut.png").write_bytes((cat / "img_00.png").read_bytes()[:200])
    Image.new("1", (12000, 12000)).save(cat / "bomb.png")
    params = _prepare(workspace, tiny_imagefolder)

    metrics = validate.main(params)

    assert metrics["images"] == 32 and metrics["classes"] == 3 and metrics["quarantined"] == 4
    with open("metrics/quarantine.csv", newline="", encoding="utf-8") as fh:
        reasons = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert reasons["empty.jpg"] == "empty file" and reasons["notes.txt"] == "not an image"
    assert reasons["cut.png"].startswith(("truncated", "cannot decode"))
    assert reasons["bomb.png"].startswith("decompression bomb")
    # quarantined, never deleted
    assert RawStore.open(Path("data/raw")).read_bytes("cat/notes.txt") == b"not an image"
    manifest = read_manifest()
    assert len(manifest) == 36 and set(validate.MANIFEST_COLUMNS) == set(manifest.columns)
    row = manifest.set_index("path").loc["data/raw/cat/cmyk.jpg"]
    assert (row["mode"], row["format"], row["width"], row["height"], bool(row["decodable"])) == (
        "CMYK",
        "JPEG",
        32,
        24,
        True,
    )
    assert json.loads(Path("metrics/validate.json").read_text())["modes"]["CMYK"] == 1
    assert Path("reports/validation/index.html").exists()


def test_too_few_images_in_a_class_fails_naming_it(workspace, tiny_imagefolder):
    params = _prepare(workspace, tiny_imagefolder, min_images_per_class=11)
    with pytest.raises(DataError) as info:
        validate.main(params)
    message = str(info.value)
    assert "min_images_per_class=11" in message and "10" in message
    assert not Path("data/manifest").exists()  # nothing that DVC could cache
    assert Path("reports/validation/index.html").exists()  # but the docs explain it


def test_image_too_small_fails_naming_the_bound(workspace, tiny_imagefolder):
    noise_image(3, size=(8, 40)).save(tiny_imagefolder / "dog" / "sliver.png")
    params = _prepare(workspace, tiny_imagefolder)
    with pytest.raises(DataError, match=r"width within validate.min_side"):
        validate.main(params)


def test_identical_image_under_two_classes_is_reported(workspace, tiny_imagefolder):
    shutil.copy(tiny_imagefolder / "cat" / "img_00.png", tiny_imagefolder / "dog" / "copy.png")
    shutil.copy(tiny_imagefolder / "cat" / "img_01.png", tiny_imagefolder / "cat" / "again.png")
    params = _prepare(workspace, tiny_imagefolder)
    metrics = validate.main(params)
    assert metrics["duplicates"] == 2 and metrics["duplicates_across_classes"] == 1
    [case] = metrics["duplicate_examples"]
    assert case["labels"] == ["cat", "dog"] and len(case["paths"]) == 2


NO_LABEL_ROWS = pd.DataFrame(columns=["row", "path", "label", "raw", "issue", "reason"], dtype=str)


def test_a_class_whose_every_file_is_quarantined_counts_zero():
    usable = pd.DataFrame(
        {"path": ["a/1.png"], "label": ["cat"], "sha256": ["1"], "phash": ["0123456789abcdef"]}
    )
    classes = validate.suite_tables(usable, ["cat", "ghost"], NO_LABEL_ROWS)["classes"]
    assert classes["images"].to_dict() == {"cat": 1, "ghost": 0}


def test_class_change_is_refused_unless_allowed(tmp_path, caplog):
    source = tmp_path / "classes.json"
    digits = {"source": "builtin:digits", "member": None}
    accepted = validate.AcceptedClasses(["a", "b"], digits)
    validate.check_class_change(None, ["a", "b"], digits, allow=False, source=source)  # first run
    validate.check_class_change(accepted, ["a", "b"], digits, allow=False, source=source)
    with pytest.raises(DataError) as info:
        validate.check_class_change(accepted, ["b", "c"], digits, allow=False, source=source)
    message = str(info.value)
    assert "added 1 ['c'], removed 1 ['a']" in message and str(source) in message
    assert "validate.allow_class_change: true" in message and "'builtin:digits'" in message
    validate.check_class_change(accepted, ["b", "c"], digits, allow=True, source=source)
    assert "added 1 ['c'], removed 1 ['a']" in caplog.text
    # A list written before sources were recorded is compared whatever the source now is.
    legacy = validate.AcceptedClasses(["a", "b"])
    with pytest.raises(DataError, match="added 1"):
        validate.check_class_change(
            legacy, ["b", "c"], {"source": "x", "member": None}, False, source
        )
    source.write_text('{"classes": "a"}')
    with pytest.raises(DataError, match="classes.json: expected"):
        validate.read_accepted_classes(source)
    source.write_text('{"classes": ["a"], "source": "builtin:digits"}')
    with pytest.raises(DataError, match="classes.json: malformed 'source'"):
        validate.read_accepted_classes(source)
    assert validate.read_accepted_classes(tmp_path / "absent.json") is None


def test_a_new_source_or_member_is_a_new_dataset_with_its_own_classes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    source = tmp_path / "classes.json"
    digits = validate.AcceptedClasses(["one", "two"], {"source": "builtin:digits", "member": None})
    caltech = {"source": "/data/101_ObjectCategories.tar.gz", "member": None}
    validate.check_class_change(digits, ["airplanes", "ant"], caltech, allow=False, source=source)
    assert "a new dataset (data.source '/data/101_ObjectCategories.tar.gz'" in caplog.text
    inner = {"source": "/data/101_ObjectCategories.tar.gz", "member": "subset"}
    at_caltech = validate.AcceptedClasses(["airplanes", "ant"], caltech)
    validate.check_class_change(at_caltech, ["ant"], inner, allow=False, source=source)
    with pytest.raises(DataError, match="removed 1 \\['airplanes'\\]"):
        validate.check_class_change(at_caltech, ["ant"], caltech, allow=False, source=source)
    written = validate.AcceptedClasses(["ant"], inner).to_dict()
    source.write_text(json.dumps(written))
    assert validate.read_accepted_classes(source) == validate.AcceptedClasses(["ant"], inner)


def _manifest() -> pd.DataFrame:
    return read_manifest()


def test_a_rerun_after_new_images_decodes_only_those(workspace, tiny_imagefolder):
    params = _prepare(workspace, tiny_imagefolder)
    first = validate.main(params)
    assert (first["decoded"], first["reused"]) == (30, 0)
    for c, label in enumerate(("cat", "dog")):
        for i in range(2):
            noise_image(900 + 10 * c + i).save(tiny_imagefolder / label / f"new_{i}.png")
    download.main(params)

    grown = validate.main(params)

    assert (grown["decoded"], grown["reused"], grown["images"]) == (4, 30, 34)
    incremental = _manifest()
    shutil.rmtree(params.paths.memo)
    scratch = validate.main(params)
    assert (scratch["decoded"], scratch["reused"]) == (34, 0)
    pd.testing.assert_frame_equal(incremental, _manifest())
    again = validate.main(params)
    assert (again["decoded"], again["reused"]) == (0, 34)


def test_a_changed_max_pixels_judges_kept_facts_and_decodes_only_what_it_must(
    workspace, tiny_imagefolder
):
    noise_image(5, size=(100, 100)).save(tiny_imagefolder / "cat" / "big.png")
    params = _prepare(workspace, tiny_imagefolder, max_pixels=5000)
    first = validate.main(params)
    assert (first["decoded"], first["quarantined"]) == (31, 1)
    big = _manifest().set_index("path").loc["data/raw/cat/big.png"]
    assert big["reason"].endswith("exceeds validate.max_pixels=5000") and pd.isna(big["phash"])

    # A higher bound: big.png was refused from its header, so now it is decoded; only it.
    raised = validate.main(_prepare(workspace, tiny_imagefolder, max_pixels=20_000))
    assert (raised["decoded"], raised["reused"], raised["quarantined"]) == (1, 30, 0)
    big = _manifest().set_index("path").loc["data/raw/cat/big.png"]
    assert bool(big["decodable"]) and len(big["phash"]) == 16

    # Back to the lower bound: every verdict comes from the kept facts.
    lowered = validate.main(_prepare(workspace, tiny_imagefolder, max_pixels=9_000))
    assert (lowered["decoded"], lowered["reused"], lowered["quarantined"]) == (0, 31, 1)
    reasons = pd.read_csv("metrics/quarantine.csv").set_index("path")["reason"]
    assert reasons["data/raw/cat/big.png"] == (
        "decompression bomb: 100x100 pixels exceeds validate.max_pixels=9000"
    )


def test_damaged_kept_facts_are_decoded_again_with_a_warning(workspace, tiny_imagefolder, caplog):
    params = _prepare(workspace, tiny_imagefolder)
    validate.main(params)
    expected = _manifest()
    [shard] = list(Path(params.paths.memo, "image_facts").glob("*/shard-*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])  # cut short, as by a crash or a full disk

    with caplog.at_level(logging.WARNING):
        again = validate.main(params)

    assert f"{shard} cannot be used" in caplog.text and "decoding its images again" in caplog.text
    assert (again["decoded"], again["reused"]) == (30, 0)
    pd.testing.assert_frame_equal(expected, _manifest())


def test_kept_facts_are_keyed_by_the_decoders(monkeypatch):
    import PIL

    from pipeline.data import factstore

    key = factstore.facts_key()
    assert factstore.facts_key() == key
    monkeypatch.setattr(PIL, "__version__", "0.0.1")
    assert factstore.facts_key() != key
