"""The source fingerprint (pipeline/sources/fingerprint.py, stage ``fingerprint``): an
unchanged source gives the same bytes, so DVC skips download; a changed one reruns it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.sources.fetch import ChecksumError
from pipeline.sources.fingerprint import fingerprint_text, source_fingerprint
from pipeline.stages import download, fingerprint
from tests.support.faults import record
from tests.support.httpserver import ServedFiles
from tests.support.images import create_image_folder, noise_image
from tests.support.project import (
    copy_project,
    dvc,
    git,
    params_with,
    raw_files,
    raw_keys,
    set_params,
)


def _digest(params, root: Path = Path(".")) -> str:
    return source_fingerprint(params.data, params.download, root)["digest"]


def test_a_folder_fingerprint_changes_with_each_kind_of_change_and_only_then(
    tmp_path, tiny_imagefolder
):
    params = params_with(data={"source": str(tiny_imagefolder)})
    first = source_fingerprint(params.data, params.download, tmp_path)
    assert first["source"]["files"] == 30 and first["source"]["kind"] == "folder"
    assert fingerprint_text(first) == fingerprint_text(
        source_fingerprint(params.data, params.download, tmp_path)
    )
    seen = {first["digest"]}
    noise_image(999).save(tiny_imagefolder / "cat" / "new.png")  # added
    seen.add(_digest(params))
    (tiny_imagefolder / "dog" / "img_00.png").unlink()  # removed
    seen.add(_digest(params))
    shutil.move(tiny_imagefolder / "cat" / "img_01.png", tiny_imagefolder / "bird" / "img_01.png")
    seen.add(_digest(params))  # relabelled: the same bytes in another class
    edited = tiny_imagefolder / "bird" / "img_02.png"
    noise_image(1234).save(edited)
    seen.add(_digest(params))
    assert len(seen) == 5
    (tiny_imagefolder / "cat" / ".DS_Store").write_bytes(b"litter")  # OS litter is not data
    assert _digest(params) in seen


def test_the_fingerprint_reads_no_image_only_sizes_and_times(tmp_path, tiny_imagefolder):
    """What it costs at 100k images: a stat per file. A same-size rewrite that keeps the
    mtime is the change it cannot see (docs/new-data.md says so)."""
    params = params_with(data={"source": str(tiny_imagefolder)})
    before = _digest(params)
    image = tiny_imagefolder / "cat" / "img_00.png"
    stat = image.stat()
    image.write_bytes(bytes(stat.st_size))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _digest(params) == before
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert _digest(params) != before


def test_a_labels_table_in_the_project_is_hashed(workspace, tiny_imagefolder):
    table = Path("labels.csv")
    table.write_text("path,label\ncat/img_00.png,cat\n")
    params = workspace(data={"source": str(tiny_imagefolder), "labels": "labels.csv"})
    record = source_fingerprint(params.data, params.download, Path("."))
    assert [f["place"] for f in record["labels"]["found"]] == ["project:labels.csv"]
    table.write_text("path,label\ncat/img_00.png,dog\n")  # same size: relabelled
    assert _digest(params) != record["digest"]
    taken = download.main(params)["taken"]
    assert taken["table_sha256"] == hashlib.sha256(table.read_bytes()).hexdigest()


def test_an_archive_is_fingerprinted_by_size_and_time_and_a_builtin_by_name(tmp_path):
    archive = tmp_path / "images.zip"
    archive.write_bytes(b"PK" + bytes(100))
    params = params_with(data={"source": str(archive)})
    record = source_fingerprint(params.data, params.download, tmp_path)
    assert (record["source"]["kind"], record["source"]["size"]) == ("file", 102)
    os.utime(archive, ns=(0, 10**18))
    assert _digest(params) != record["digest"]
    builtin = params_with(data={"source": "builtin:digits-mini"})
    assert source_fingerprint(builtin.data, builtin.download, tmp_path)["source"] == {
        "kind": "builtin",
        "name": "builtin:digits-mini",
    }


def test_the_stage_rewrites_its_file_only_when_the_source_changed(workspace, tiny_imagefolder):
    params = workspace(data={"source": str(tiny_imagefolder)})
    target = params.paths.source_fingerprint
    fingerprint.run(params.paths, params.data, params.download)
    stamp = target.stat().st_mtime_ns
    text = target.read_text()
    fingerprint.run(params.paths, params.data, params.download)
    assert target.read_text() == text and target.stat().st_mtime_ns == stamp
    assert "mtime" not in text and json.loads(text)["source"]["files"] == 30
    noise_image(7).save(tiny_imagefolder / "dog" / "more.png")
    fingerprint.run(params.paths, params.data, params.download)
    assert json.loads(target.read_text())["source"]["files"] == 31


def test_follow_and_a_pin_are_one_or_the_other():
    with pytest.raises(ConfigError, match="data.follow is true, so data.sha256 must be null"):
        params_with(
            data={"source": "https://example.org/a.zip", "sha256": "a" * 64, "follow": True}
        )
    with pytest.raises(ConfigError, match="or set data.follow: true"):
        download.fetch_remote(
            "https://example.org/a.zip", "data.sha256", None, None,
            params_with().data, params_with().download, Path("unused"), None,
        )  # fmt: skip


def _zip_of(folder: Path, dest: Path) -> bytes:
    return Path(shutil.make_archive(str(dest), "zip", folder)).read_bytes()


def test_a_pinned_url_that_changed_upstream_fails_naming_the_url_and_both_digests(
    workspace, tmp_path
):
    old = _zip_of(create_image_folder(tmp_path / "v1", {"a": 3, "b": 3}), tmp_path / "v1")
    new = _zip_of(create_image_folder(tmp_path / "v2", {"a": 4, "b": 3}, seed=5), tmp_path / "v2")
    with ServedFiles({"/images.zip": old}) as server:
        pin = hashlib.sha256(old).hexdigest()
        params = workspace(data={"source": server.url("/images.zip"), "sha256": pin})
        fingerprint.run(params.paths, params.data, params.download)
        assert download.main(params)["files"] == 6
        server.content = {"/images.zip": new}
        fingerprint.run(params.paths, params.data, params.download)
        with pytest.raises(ChecksumError) as caught:
            download.main(params)
    message = str(caught.value)
    assert server.url("/images.zip") in message and pin in message
    assert hashlib.sha256(new).hexdigest() in message and "\n" not in message


def test_a_followed_url_takes_the_new_content_and_records_it(workspace, tmp_path):
    old = _zip_of(create_image_folder(tmp_path / "v1", {"a": 3, "b": 3}), tmp_path / "v1")
    new = _zip_of(create_image_folder(tmp_path / "v2", {"a": 4, "b": 3}, seed=5), tmp_path / "v2")
    with ServedFiles({"/images.zip": old}) as server:
        params = workspace(data={"source": server.url("/images.zip"), "follow": True})
        fingerprint.run(params.paths, params.data, params.download)
        first = download.main(params)
        gets = len([s for s in server.seen if s.method == "GET"])
        assert download.main(params)["taken"] == first["taken"]  # a rerun, nothing new
        assert len([s for s in server.seen if s.method == "GET"]) == gets  # the kept copy
        server.content = {"/images.zip": new}
        fingerprint.run(params.paths, params.data, params.download)
        second = download.main(params)
    assert first["taken"]["sha256"] == hashlib.sha256(old).hexdigest()
    assert second["taken"] == {"sha256": hashlib.sha256(new).hexdigest(), "bytes": len(new)}
    assert second["files"] == 7 and second["follow"] is True
    assert second["fingerprint"] == json.loads(Path("data/source.json").read_text())["digest"]
    assert json.loads(Path("data/source.json").read_text())["source"]["kind"] == "url"


def _repro(repo: Path, *targets: str) -> str:
    return dvc(repo, "repro", *targets)


@pytest.mark.slow
def test_dvc_reruns_download_exactly_when_a_folder_source_changed(tmp_path, tiny_imagefolder):
    repo = copy_project(tmp_path / "repo")
    set_params(repo, data={"source": str(tiny_imagefolder)})
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    first = _repro(repo, "download")
    assert "Running stage 'download'" in first
    recorded = (repo / "data/source.json").read_bytes()
    again = _repro(repo, "download")
    assert "Running stage 'fingerprint'" in again and "Running stage 'download'" not in again
    assert (repo / "data/source.json").read_bytes() == recorded
    status = json.loads(dvc(repo, "status", "--json", "download"))
    assert set(status) <= {"fingerprint"}, status  # always changed; download up to date

    noise_image(4242).save(tiny_imagefolder / "cat" / "added.png")
    (tiny_imagefolder / "dog" / "img_03.png").unlink()
    shutil.move(tiny_imagefolder / "bird" / "img_04.png", tiny_imagefolder / "cat" / "img_04b.png")
    assert "Running stage 'download'" in _repro(repo, "download")
    files = raw_keys(repo / "data/raw")
    assert {"cat/added.png", "cat/img_04b.png"} <= files
    assert not {"dog/img_03.png", "bird/img_04.png"} & files and len(files) == 30
    edited = tiny_imagefolder / "bird" / "img_05.png"
    noise_image(77).save(edited)
    assert "Running stage 'download'" in _repro(repo, "download")
    assert raw_files(repo / "data/raw")["bird/img_05.png"] == edited.read_bytes()
    assert "Running stage 'download'" not in _repro(repo, "download")


@pytest.mark.slow
@pytest.mark.faults
def test_offline_dvc_repro_of_a_pinned_url_finds_download_up_to_date(tmp_path):
    """DVC deletes a stage's outputs before running it unless they persist: the last
    record must survive into the offline run for the pin to vouch for it."""
    body = _zip_of(create_image_folder(tmp_path / "v1", {"a": 3, "b": 3}), tmp_path / "v1")
    repo = copy_project(tmp_path / "repo")
    git(repo, "init", "-q")
    with ServedFiles({"/images.zip": body}) as server:
        set_params(
            repo,
            data={"source": server.url("/images.zip"), "sha256": hashlib.sha256(body).hexdigest()},
            download={"retries": 0, "timeout_s": 2},
        )
        assert "Running stage 'download'" in _repro(repo, "download")
    recorded = (repo / "data/source.json").read_bytes()
    offline = _repro(repo, "download")  # the server is gone
    assert "Running stage 'download'" not in offline
    assert (repo / "data/source.json").read_bytes() == recorded
    record("network down: `dvc repro` of a pinned URL keeps the last fingerprint", 1, 1)


def test_a_url_is_fingerprinted_by_head_or_a_ranged_get_where_head_is_refused():
    from pipeline.sources.fetch import url_validators
    from tests.support.httpserver import Faults, etag_of

    body = b"x" * 1000
    with ServedFiles({"/a.zip": body}, Faults(fail_with=[503, 405])) as server:
        seen = url_validators(server.url("/a.zip"), retries=1, backoff_s=0)
    assert seen == {"etag": etag_of(body), "last_modified": server.last_modified, "size": 1000}
    # a 503 retried, a refused HEAD, then the first byte asked for
    assert [(s.method, s.headers.get("Range")) for s in server.seen] == [
        ("HEAD", None),
        ("HEAD", None),
        ("GET", "bytes=0-0"),
    ]


def test_offline_a_pinned_url_keeps_its_last_record_and_a_followed_one_fails(workspace, tmp_path):
    from pipeline.sources.fetch import DownloadError

    body = _zip_of(create_image_folder(tmp_path / "v1", {"a": 3}), tmp_path / "v1")
    with ServedFiles({"/images.zip": body}) as server:
        url = server.url("/images.zip")
        pinned = workspace(data={"source": url, "sha256": hashlib.sha256(body).hexdigest()})
        fingerprint.run(pinned.paths, pinned.data, pinned.download)
    recorded = Path("data/source.json").read_bytes()
    offline = params_with(
        data={"source": url, "sha256": hashlib.sha256(body).hexdigest()},
        download={"retries": 0, "timeout_s": 2},
    )
    fingerprint.run(offline.paths, offline.data, offline.download)  # the server is gone
    assert Path("data/source.json").read_bytes() == recorded
    other = url.replace("/images.zip", "/other.zip")  # a record of another URL stands for nothing
    moved = params_with(data={"source": other, "sha256": "0" * 64}, download={"retries": 0})
    with pytest.raises(DownloadError, match="other.zip"):
        fingerprint.run(moved.paths, moved.data, moved.download)
    followed = params_with(data={"source": url, "follow": True}, download={"retries": 0})
    with pytest.raises(DownloadError, match=url):
        fingerprint.run(followed.paths, followed.data, followed.download)
