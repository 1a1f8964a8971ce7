"""``s3://`` sources on a real S3 API (moto's server on loopback): a prefix of
``<class>/<image>`` objects or one archive object, fingerprinted by listing and fetched
once per (key, ETag)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.sources.fetch import ChecksumError
from pipeline.stages import download, fingerprint
from tests.support.images import create_image_folder, noise_image
from tests.support.project import raw_files, raw_keys
from tests.support.s3 import s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The standard AWS variables, endpoint included: nothing in params.yaml or code."""
    for key, value in {**s3.env(), "AWS_ENDPOINT_URL": s3.endpoint}.items():
        monkeypatch.setenv(key, value)
    return s3


def _upload(s3, folder: Path, prefix: str) -> int:
    client = s3.client()
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(
                str(path), s3.bucket, f"{prefix}{path.relative_to(folder).as_posix()}"
            )
            count += 1
    return count


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def _raw() -> set[str]:
    return raw_keys(Path("data/raw"))


def _both(params) -> dict:
    fingerprint.run(params.paths, params.data, params.download)
    return download.main(params)


def test_a_prefix_is_listed_fetched_once_and_followed(workspace, s3_env, tiny_imagefolder):
    s3 = s3_env
    _upload(s3, tiny_imagefolder, "sets/a/")
    params = workspace(data={"source": f"s3://{s3.bucket}/sets/a/"})
    first = _both(params)
    record = json.loads(Path("data/source.json").read_text())
    assert (record["source"]["kind"], record["source"]["objects"]) == ("s3-prefix", 30)
    assert first["files"] == 30 and first["taken"]["fetched"] == 30
    text = Path("data/source.json").read_bytes()
    fingerprint.run(params.paths, params.data, params.download)
    assert Path("data/source.json").read_bytes() == text  # unchanged: byte-identical

    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="sets/a/cat/new.png", Body=_png(501))
    client.put_object(Bucket=s3.bucket, Key="sets/a/fox/f1.png", Body=_png(502))
    client.delete_object(Bucket=s3.bucket, Key="sets/a/dog/img_00.png")
    client.copy_object(
        Bucket=s3.bucket, Key="sets/a/bird/moved.png",
        CopySource={"Bucket": s3.bucket, "Key": "sets/a/cat/img_01.png"},
    )  # fmt: skip
    client.delete_object(Bucket=s3.bucket, Key="sets/a/cat/img_01.png")
    second = _both(params)
    assert Path("data/source.json").read_bytes() != text
    # only what is new by (key, ETag) crosses the network; the rest comes from the cache
    assert second["taken"]["fetched"] == 3 and second["taken"]["objects"] == 31
    files = _raw()
    assert {"cat/new.png", "fox/f1.png", "bird/moved.png"} <= files
    assert not {"dog/img_00.png", "cat/img_01.png"} & files
    assert raw_files()["cat/new.png"] == _png(501)

    client.put_object(Bucket=s3.bucket, Key="sets/a/cat/new.png", Body=_png(503))  # edited
    third = _both(params)
    assert third["taken"]["fetched"] == 1
    assert raw_files()["cat/new.png"] == _png(503)


def test_an_archive_object_is_pinned_or_followed(workspace, s3_env, tmp_path):
    s3 = s3_env
    client = s3.client()
    folder = create_image_folder(tmp_path / "v1", {"a": 3, "b": 3})
    old = Path(shutil.make_archive(str(tmp_path / "v1"), "zip", folder)).read_bytes()
    client.put_object(Bucket=s3.bucket, Key="archives/images.zip", Body=old)
    url = f"s3://{s3.bucket}/archives/images.zip"
    pinned = workspace(data={"source": url, "sha256": hashlib.sha256(old).hexdigest()})
    assert _both(pinned)["files"] == 6
    record = json.loads(Path("data/source.json").read_text())["source"]
    assert record["kind"] == "s3-object" and record["size"] == len(old) and record["etag"]

    create_image_folder(tmp_path / "v1", {"a": 5}, seed=3)
    new = Path(shutil.make_archive(str(tmp_path / "v2"), "zip", folder)).read_bytes()
    client.put_object(Bucket=s3.bucket, Key="archives/images.zip", Body=new)
    with pytest.raises(ChecksumError, match=hashlib.sha256(new).hexdigest()):
        _both(pinned)
    with pytest.raises(ConfigError, match="data.follow"):
        _both(workspace(data={"source": url}))
    followed = _both(workspace(data={"source": url, "follow": True}))
    assert followed["files"] == 8 and followed["taken"]["sha256"] == hashlib.sha256(new).hexdigest()


def test_an_empty_prefix_fails_naming_it(workspace, s3_env):
    params = workspace(data={"source": f"s3://{s3_env.bucket}/nothing/here/"})
    with pytest.raises(DataError, match="nothing at s3://"):
        fingerprint.run(params.paths, params.data, params.download)


@pytest.mark.slow
def test_dvc_skips_download_until_the_prefix_changes(s3_env, tiny_imagefolder, tmp_path):
    from tests.support.project import copy_project, dvc, git, set_params

    s3 = s3_env
    _upload(s3, tiny_imagefolder, "dvc/set/")
    repo = copy_project(tmp_path / "repo")
    set_params(repo, data={"source": f"s3://{s3.bucket}/dvc/set/"})
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    assert "Running stage 'download'" in dvc(repo, "repro", "download")
    recorded = (repo / "data/source.json").read_bytes()
    assert "Running stage 'download'" not in dvc(repo, "repro", "download")
    assert (repo / "data/source.json").read_bytes() == recorded
    s3.client().put_object(Bucket=s3.bucket, Key="dvc/set/dog/late.png", Body=_png(900))
    shards = sorted((repo / "data/raw/shards").iterdir())
    # each shard its own file, not a link of the download cache or of the last store: DVC
    # would copy every linked file of the persisted data/raw before the next download
    assert {p.stat().st_nlink for p in shards} == {1}
    inodes = {p: p.stat().st_ino for p in shards}
    assert "Running stage 'download'" in dvc(repo, "repro", "download")
    assert raw_files(repo / "data/raw")["dog/late.png"] == _png(900)
    metrics = json.loads((repo / "metrics/download.json").read_text())
    assert metrics["taken"]["fetched"] == 1 and metrics["files"] == 31
    assert metrics["reused"] == 30 and all(p.stat().st_ino == i for p, i in inodes.items())
    assert metrics["store"]["new_shards"] == 1
    assert {p.stat().st_nlink for p in (repo / "data/raw/shards").iterdir()} == {1}
