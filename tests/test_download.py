from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import unicodedata
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.sources.fetch import ChecksumError
from pipeline.stages import download
from tests.support.httpserver import Faults, ServedFiles
from tests.support.images import create_image_folder, noise_image


def _tar_gz(folder: Path, dest: Path, top: str) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return dest


def _raw_files(root: Path = Path("data/raw")) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _run(make_params, **data):
    params = make_params(data=data)
    return download.main(params)


def test_local_folder_is_copied_and_excluded_classes_dropped(workspace, tiny_imagefolder):
    (tiny_imagefolder / "BACKGROUND_Google").mkdir()
    (tiny_imagefolder / "BACKGROUND_Google" / "tmp").write_bytes(b"junk")
    (tiny_imagefolder / "cat" / ".DS_Store").write_bytes(b"litter")
    (tiny_imagefolder / "__MACOSX").mkdir()
    (tiny_imagefolder / "__MACOSX" / "._cat").write_bytes(b"litter")
    summary = _run(workspace, source=str(tiny_imagefolder))
    files = _raw_files()
    assert len(files) == 30 and {f.split("/")[0] for f in files} == {"bird", "cat", "dog"}
    assert summary["classes"] == 3 and summary["files"] == 30
    assert json.loads(Path("metrics/download.json").read_text())["class_counts"]["cat"] == 10
    assert (tiny_imagefolder / "cat" / "img_00.png").exists()  # the source is untouched


def test_a_rerun_links_the_unchanged_files_and_writes_only_what_changed(
    workspace, tiny_imagefolder, tmp_path
):
    """Same inode and mtime for an unchanged image is what spares DVC reading it again."""
    _run(workspace, source=str(tiny_imagefolder))
    raw = Path("data/raw")
    before = {f: (raw / f).stat() for f in _raw_files()}
    noise_image(4242).save(tiny_imagefolder / "cat" / "added.png")
    noise_image(77).save(tiny_imagefolder / "bird" / "img_05.png")  # edited in place
    same_size = tiny_imagefolder / "cat" / "img_01.png"  # one byte changed, same size
    body = bytearray(same_size.read_bytes())
    body[-20] ^= 0xFF
    same_size.write_bytes(bytes(body))
    (tiny_imagefolder / "dog" / "img_03.png").unlink()
    summary = _run(workspace, source=str(tiny_imagefolder))
    after = {f: (raw / f).stat() for f in _raw_files()}
    assert summary["files"] == 30 and summary["reused"] == 27
    assert set(after) == set(before) - {"dog/img_03.png"} | {"cat/added.png"}
    assert (raw / "cat/img_01.png").read_bytes() == bytes(body)
    for name in set(before) & set(after) - {"bird/img_05.png", "cat/img_01.png"}:
        assert (after[name].st_ino, after[name].st_mtime_ns) == (
            before[name].st_ino,
            before[name].st_mtime_ns,
        ), name
    assert after["bird/img_05.png"].st_ino != before["bird/img_05.png"].st_ino
    edited = (tiny_imagefolder / "bird" / "img_05.png").read_bytes()
    assert (raw / "bird/img_05.png").read_bytes() == edited
    # from an archive too: its extracted files are compared byte for byte
    archive = _tar_gz(tiny_imagefolder, tmp_path / "images.tar.gz", "images")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert _run(workspace, source=str(archive), sha256=digest)["reused"] == 30
    fifo = raw / "cat" / "img_02.png"  # a FIFO where an image was must not block the run
    fifo.unlink()
    os.mkfifo(fifo)
    assert _run(workspace, source=str(archive), sha256=digest)["reused"] == 29
    assert (raw / "cat" / "img_02.png").read_bytes() == (
        tiny_imagefolder / "cat/img_02.png"
    ).read_bytes()
    assert _raw_files() == set(after)


def test_archive_top_folder_is_unwrapped(workspace, tiny_imagefolder, tmp_path):
    archive = _tar_gz(tiny_imagefolder, tmp_path / "images.tar.gz", "101_ObjectCategories")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    _run(workspace, source=str(archive), sha256=digest)
    assert "cat/img_00.png" in _raw_files()


def test_nested_archive_with_images_is_found(workspace, tiny_imagefolder, tmp_path):
    inner = _tar_gz(
        tiny_imagefolder, tmp_path / "101_ObjectCategories.tar.gz", "101_ObjectCategories"
    )
    notes = io.BytesIO()
    with tarfile.open(fileobj=notes, mode="w") as tar:
        info = tarfile.TarInfo("Annotations/cat/annotation_0001.mat")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"MATL"))
    outer = tmp_path / "caltech-101.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(inner, "caltech-101/101_ObjectCategories.tar.gz")
        zf.writestr("caltech-101/Annotations.tar", notes.getvalue())
        zf.writestr("caltech-101/show_annotation.m", "% matlab")
        zf.writestr("__MACOSX/caltech-101/._101_ObjectCategories.tar.gz", "litter")
    _run(workspace, source=f"file://{outer}")
    assert len(_raw_files()) == 30


def test_data_member_picks_among_several_image_archives(workspace, tiny_imagefolder, tmp_path):
    a = _tar_gz(tiny_imagefolder, tmp_path / "a.tar.gz", "a")
    other = create_image_folder(tmp_path / "other", {"fish": 4})
    b = _tar_gz(other, tmp_path / "b.tar.gz", "b")
    outer = tmp_path / "both.zip"
    with zipfile.ZipFile(outer, "w") as zf:
        zf.write(a, "a.tar.gz")
        zf.write(b, "b.tar.gz")
    with pytest.raises(DataError, match="several nested archives hold images.*data.member"):
        _run(workspace, source=str(outer))
    _run(workspace, source=str(outer), member="b.tar.gz")
    assert _raw_files() == {f"fish/img_0{i}.png" for i in range(4)}


def test_unicode_class_names_are_kept_in_nfc(workspace, tmp_path):
    decomposed = unicodedata.normalize("NFD", "café crème")
    src = create_image_folder(tmp_path / "src", {decomposed: 3, "東京 タワー": 3})
    _run(workspace, source=str(src))
    assert {p.name for p in Path("data/raw").iterdir()} == {"café crème", "東京 タワー"}
    assert all(unicodedata.is_normalized("NFC", name) for name in _raw_files())


def test_classes_colliding_after_nfc_are_an_error(workspace, tmp_path):
    src = create_image_folder(tmp_path / "src", {unicodedata.normalize("NFD", "café"): 3})
    create_image_folder(src, {unicodedata.normalize("NFC", "café"): 3})
    if len(list(src.iterdir())) < 2:
        pytest.skip("this file system normalises names itself")
    with pytest.raises(DataError, match="same name after Unicode NFC"):
        _run(workspace, source=str(src))


def test_builtin_digits(workspace):
    summary = _run(workspace, source="builtin:digits")
    assert summary["classes"] == 10 and summary["files"] == 1797
    assert "zero/digit_0000.png" in _raw_files()


def test_builtin_digits_mini_is_the_first_fifty_of_each_digit(workspace):
    summary = _run(workspace, source="builtin:digits-mini")
    assert summary["classes"] == 10 and summary["files"] == 500
    files = _raw_files()
    per_class = {name: sum(f.startswith(name + "/") for f in files) for name in ("zero", "nine")}
    assert per_class == {"zero": 50, "nine": 50}
    # the same images as the full set's first ones (rendered identically)
    assert "zero/digit_0000.png" in files and "one/digit_0001.png" in files
    with pytest.raises(ConfigError, match="unknown builtin dataset 'letters'"):
        _run(workspace, source="builtin:letters")


def test_url_download_resumes_and_verifies(workspace, tiny_imagefolder, tmp_path):
    archive = _tar_gz(tiny_imagefolder, tmp_path / "images.tgz", "images")
    payload = archive.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    with ServedFiles({"/d/images.tgz": payload}, Faults(drop_after=len(payload) // 3)) as server:
        _run(workspace, source=server.url("/d/images.tgz"), sha256=digest)
        ranges = [s.headers.get("Range") for s in server.requests_for("/d/images.tgz")]
    assert ranges[0] is None and ranges[-1] == f"bytes={len(payload) // 3}-"
    assert len(_raw_files()) == 30


def test_url_needs_a_sha256_and_a_mismatch_changes_nothing(workspace, tiny_imagefolder, tmp_path):
    _run(workspace, source=str(tiny_imagefolder))
    before = _raw_files()
    archive = _tar_gz(
        create_image_folder(tmp_path / "new", {"fish": 3}), tmp_path / "new.tgz", "new"
    )
    with ServedFiles({"/new.tgz": archive.read_bytes()}) as server:
        with pytest.raises(ConfigError, match="data.sha256 is required"):
            _run(workspace, source=server.url("/new.tgz"))
        with pytest.raises(ChecksumError, match="expected 0{64}"):
            _run(workspace, source=server.url("/new.tgz"), sha256="0" * 64)
    assert _raw_files() == before  # the previous output is intact
    assert not list(Path("data/downloads").glob("*new.tgz*"))
    assert not [p for p in Path("data").iterdir() if p.name.startswith(".")]


def test_bad_sources_name_what_is_wrong(workspace, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _run(workspace, source=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="unsupported scheme 'ftp'"):
        _run(workspace, source="ftp://example.org/x.zip")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="not a folder nor a supported archive"):
        _run(workspace, source=str(text))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        _run(workspace, source=str(text), sha256="1" * 64)


def test_md5_only_source_is_verified_and_reused(workspace, tiny_imagefolder, tmp_path):
    archive = _tar_gz(tiny_imagefolder, tmp_path / "images.tgz", "images")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with ServedFiles({"/images.tgz": archive.read_bytes()}) as server:
        with pytest.raises(ChecksumError, match=f"md5 mismatch: expected {'0' * 32}, got {md5}"):
            _run(workspace, source=server.url("/images.tgz"), md5="0" * 32)
        assert not list(Path("data/downloads").iterdir())
        _run(workspace, source=server.url("/images.tgz"), md5=md5)
        _run(workspace, source=server.url("/images.tgz"), md5=md5, exclude_classes=["cat"])
        assert len(server.requests_for("/images.tgz")) == 2  # the second run reused the file
    assert {f.split("/")[0] for f in _raw_files()} == {"bird", "dog"}
