from __future__ import annotations

import hashlib
import io
import json
import tarfile
import unicodedata
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data import rawstore
from pipeline.errors import ConfigError, DataError
from pipeline.sources.fetch import ChecksumError
from pipeline.stages import download
from tests.support.httpserver import Faults, ServedFiles
from tests.support.images import create_image_folder, noise_image
from tests.support.project import raw_files


def _tar_gz(folder: Path, dest: Path, top: str) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return dest


def _raw_files(root: Path = Path("data/raw")) -> dict[str, bytes]:
    """``<class>/<file>`` → bytes: of the raw store at ``root``, or of a folder's files."""
    if (root / rawstore.INDEX).is_dir():
        return raw_files(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


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


def _reads(monkeypatch) -> list[str]:
    """The keys whose source files the raw store reads, from now on."""
    read, real = [], rawstore._image_bytes

    def counted(key, source, stat):
        read.append(key)
        return real(key, source, stat)

    monkeypatch.setattr(rawstore, "_image_bytes", counted)
    return read


def test_a_rerun_reads_only_the_new_and_changed_files(workspace, tiny_imagefolder, monkeypatch):
    """The memo keeps each file's sha256 by path, inode, size and mtime: an unchanged file
    whose image a kept shard holds is not read again."""
    _run(workspace, source=str(tiny_imagefolder))
    read = _reads(monkeypatch)
    noise_image(99).save(tiny_imagefolder / "cat" / "new.png")
    edited = tiny_imagefolder / "dog" / "img_03.png"
    noise_image(98).save(edited)  # edited in place: a new mtime
    summary = _run(workspace, source=str(tiny_imagefolder))
    assert sorted(read) == ["cat/new.png", "dog/img_03.png"]
    assert (summary["files"], summary["reused"]) == (31, 29)
    assert _raw_files() == _raw_files(tiny_imagefolder)

    read.clear()
    _run(workspace, source=str(tiny_imagefolder))
    assert read == []  # nothing changed: nothing read
    # a damaged memo entry is read as none: every file is read, the store is the same
    [entry] = Path("data/memo/file_hashes").glob("*.parquet")
    entry.write_bytes(b"not parquet")
    _run(workspace, source=str(tiny_imagefolder))
    assert len(read) == 31 and _raw_files() == _raw_files(tiny_imagefolder)


def test_files_unpacked_from_an_archive_are_read_every_run(
    workspace, tiny_imagefolder, tmp_path, monkeypatch
):
    """Their inodes live only as long as the run's temporary folder: none is recorded."""
    archive = _tar_gz(tiny_imagefolder, tmp_path / "images.tgz", "images")
    _run(workspace, source=str(archive))
    read = _reads(monkeypatch)
    _run(workspace, source=str(archive))
    assert len(read) == 30
    [entry] = Path("data/memo/file_hashes").glob("*.parquet")
    assert len(pd.read_parquet(entry)) == 0


def test_a_rerun_links_the_unchanged_shards_and_writes_only_what_changed(
    workspace, tiny_imagefolder, tmp_path
):
    """Same inode and mtime for an unchanged shard is what spares DVC reading (and pushing)
    it again; the changed and added images go into one new shard."""
    _run(workspace, source=str(tiny_imagefolder))
    shards = Path("data/raw") / rawstore.SHARDS
    before = {p.name: p.stat() for p in shards.iterdir()}
    noise_image(4242).save(tiny_imagefolder / "cat" / "added.png")
    noise_image(77).save(tiny_imagefolder / "bird" / "img_05.png")  # edited in place
    same_size = tiny_imagefolder / "cat" / "img_01.png"  # one byte changed, same size
    body = bytearray(same_size.read_bytes())
    body[-20] ^= 0xFF
    same_size.write_bytes(bytes(body))
    (tiny_imagefolder / "dog" / "img_03.png").unlink()
    summary = _run(workspace, source=str(tiny_imagefolder))
    after = {p.name: p.stat() for p in shards.iterdir()}
    assert summary["files"] == 30 and summary["reused"] == 27
    assert summary["store"]["new_shards"] == 1 and set(before) < set(after)
    (added,) = set(after) - set(before)
    with tarfile.open(shards / added) as tar:
        assert len(tar.getnames()) == 3  # the added image and the two edited ones
    assert summary["store"]["new_bytes"] == after[added].st_size
    for name in before:
        assert (after[name].st_ino, after[name].st_mtime_ns) == (
            before[name].st_ino,
            before[name].st_mtime_ns,
        ), name
    files = _raw_files()
    assert set(files) == set(_raw_files(tiny_imagefolder))
    assert files["cat/img_01.png"] == bytes(body)
    assert files["bird/img_05.png"] == (tiny_imagefolder / "bird" / "img_05.png").read_bytes()
    # from an archive too: every extracted file is already in the store
    archive = _tar_gz(tiny_imagefolder, tmp_path / "images.tar.gz", "images")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert _run(workspace, source=str(archive), sha256=digest)["reused"] == 30
    (shards / added).unlink()  # a shard lost from the workspace: its images written again
    summary = _run(workspace, source=str(archive), sha256=digest)
    assert (summary["reused"], summary["store"]["new_shards"]) == (27, 1)
    assert _raw_files() == files


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
    assert set(_raw_files()) == {f"fish/img_0{i}.png" for i in range(4)}


def test_unicode_class_names_are_kept_in_nfc(workspace, tmp_path):
    decomposed = unicodedata.normalize("NFD", "café crème")
    src = create_image_folder(tmp_path / "src", {decomposed: 3, "東京 タワー": 3})
    _run(workspace, source=str(src))
    assert {f.split("/")[0] for f in _raw_files()} == {"café crème", "東京 タワー"}
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


def test_an_unreadable_last_store_is_written_anew(workspace, tiny_imagefolder, caplog):
    params = workspace(data={"source": str(tiny_imagefolder)})
    download.main(params)
    Path("data/raw/index/part-000000.parquet").write_bytes(b"not a parquet file")
    summary = download.main(params)
    assert (summary["files"], summary["reused"]) == (30, 0)
    assert "not reusing the last raw store data/raw" in caplog.text
    assert _raw_files() == _raw_files(tiny_imagefolder)
