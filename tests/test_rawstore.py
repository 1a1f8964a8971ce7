"""The raw store (issue 38): content-addressed tar shards and an index; a grown dataset
adds a shard, and the distributed data bus pushes and pulls only that shard."""

from __future__ import annotations

import hashlib
import logging
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from flows.databus import cache_objects, check_out_inputs, push_outputs
from pipeline.data import rawstore
from pipeline.data.rawstore import RawStore, write_store
from pipeline.errors import DataError
from tests.support.images import colour_images
from tests.support.prefect import make_repo
from tests.support.project import dvc, git
from tests.support.s3 import s3_server


def files_of(folder: Path) -> list[tuple[str, str, Path]]:
    """(``<class>/<file>``, class, file) for every file under ``folder``, as download lists."""
    return [
        (p.relative_to(folder).as_posix(), p.parent.name, p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def stored(root: Path, files, previous: RawStore | None = None, limit: int = 1 << 20):
    written = write_store(files, root, previous, limit)
    return RawStore.open(root), written


def members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_every_file_reads_back_and_each_shard_is_named_by_its_bytes(tmp_path):
    images = colour_images(tmp_path / "images", per_class=6)
    (images / "red" / "copy.png").write_bytes((images / "blue" / "img_00.png").read_bytes())
    (images / "red" / "copy.PNG.jpg").write_bytes((images / "blue" / "img_00.png").read_bytes())
    (images / "red" / "empty.png").write_bytes(b"")
    (images / "red" / "odd name.j p;g").write_bytes(b"not an image")
    files = files_of(images)
    store, written = stored(tmp_path / "raw", files, limit=4096)

    assert written.files == len(files) == 22 and written.reused == 0
    assert list(store.index["path"]) == sorted(key for key, _, _ in files)
    for key, label, source in files:
        assert store.read_bytes(key) == source.read_bytes()
        assert store.index.set_index("path").loc[key, "label"] == label
    shards = sorted((tmp_path / "raw" / rawstore.SHARDS).iterdir())
    assert len(shards) == written.shards > 1  # the 4 kB limit closed several
    for shard in shards:
        assert shard.name == hashlib.sha256(shard.read_bytes()).hexdigest() + ".tar"
    # copies are stored once: one tar member per distinct image, named by its sha256
    names = [name for shard in shards for name in members(shard)]
    shas = set(store.index["sha256"])
    assert len(names) == len(shas) == 20 and {n[:64] for n in names} == shas
    suffixes = sorted(n[64:] for n in names)
    assert suffixes == ["", ".png", *[".png"] * 18]  # an odd suffix is left off the name


def test_the_same_files_in_any_order_give_the_same_shards(tmp_path):
    images = colour_images(tmp_path / "images", per_class=5)
    files = files_of(images)
    stored(tmp_path / "a", files, limit=4096)
    copies = tmp_path / "copies"  # the same bytes, other mtimes and modes, listed backwards
    for key, _, source in files:
        (copies / key).parent.mkdir(parents=True, exist_ok=True)
        (copies / key).write_bytes(source.read_bytes())
        (copies / key).chmod(0o600)
    stored(tmp_path / "b", list(reversed(files_of(copies))), limit=4096)
    a = {p.name: p.read_bytes() for p in (tmp_path / "a" / rawstore.SHARDS).iterdir()}
    b = {p.name: p.read_bytes() for p in (tmp_path / "b" / rawstore.SHARDS).iterdir()}
    assert a == b and len(a) > 1
    index_a = {p.name: p.read_bytes() for p in (tmp_path / "a" / rawstore.INDEX).iterdir()}
    assert index_a == {p.name: p.read_bytes() for p in (tmp_path / "b" / rawstore.INDEX).iterdir()}


def test_a_file_too_large_for_the_store_is_a_one_line_error(tmp_path, monkeypatch):
    images = colour_images(tmp_path / "images", per_class=2)
    monkeypatch.setattr(rawstore, "MAX_FILE_BYTES", 100)
    with pytest.raises(DataError, match=r"^blue/img_00.png: [\d,]+ bytes, more than the 100 "):
        write_store(files_of(images), tmp_path / "raw")
    assert not list((tmp_path / "raw").rglob("*.tar"))


def test_growth_links_the_old_shards_and_writes_only_the_new_images(tmp_path):
    images = colour_images(tmp_path / "images", per_class=10)
    first, _ = stored(tmp_path / "one", files_of(images))
    colour_images(images, per_class=3, start=10, classes=("red",))
    second, written = stored(tmp_path / "two", files_of(images), previous=first)

    old = {p.name: p for p in (tmp_path / "one" / rawstore.SHARDS).iterdir()}
    new = {p.name: p for p in (tmp_path / "two" / rawstore.SHARDS).iterdir()}
    assert set(old) < set(new) and written.new_shards == 1
    for name, path in old.items():  # the same file, not a copy
        assert path.stat().st_ino == new[name].stat().st_ino
    (added,) = set(new) - set(old)
    with tarfile.open(new[added]) as tar:
        assert len(tar.getnames()) == 3
    assert (written.files, written.reused) == (33, 30)
    assert written.new_bytes == new[added].stat().st_size
    for key, _, source in files_of(images):
        assert second.read_bytes(key) == source.read_bytes()


def test_a_shard_mostly_deleted_is_rewritten_and_one_wholly_deleted_is_gone(tmp_path):
    images = colour_images(tmp_path / "images", per_class=8)
    files = files_of(images)
    first, written = stored(tmp_path / "one", files, limit=12000)
    assert written.shards >= 3
    by_shard = first.index.groupby("shard")["path"].apply(list)
    emptied, thinned = by_shard.index[0], by_shard.index[1]
    gone = set(by_shard[emptied]) | set(by_shard[thinned][1:])
    kept_files = [f for f in files if f[0] not in gone]
    second, _ = stored(tmp_path / "two", kept_files, previous=first, limit=12000)

    shards = {p.name for p in (tmp_path / "two" / rawstore.SHARDS).iterdir()}
    assert emptied not in shards and thinned not in shards
    assert set(by_shard.index[2:]) <= shards  # untouched shards are kept
    assert set(second.index["shard"]) == shards  # nothing unreferenced is left
    for key, _, source in kept_files:
        assert second.read_bytes(key) == source.read_bytes()


def test_a_damaged_shard_is_not_copied_forward(tmp_path):
    """Images moved out of a shard that is not kept are checked against their sha256; a
    damaged one is taken from the source again, and a shard cut short is not kept."""
    images = colour_images(tmp_path / "images", per_class=8)
    files = files_of(images)
    first, _ = stored(tmp_path / "one", files, limit=12000)
    by_shard = first.index.groupby("shard")
    thinned, cut = list(by_shard.groups)[:2]
    survivor = first.index[first.index["shard"] == thinned].iloc[0]
    shard = first.shard_path(thinned)
    body = bytearray(shard.read_bytes())
    body[int(survivor["offset"]) + 30] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(body))
    first.shard_path(cut).write_bytes(first.shard_path(cut).read_bytes()[:2048])
    gone = set(first.index.loc[first.index["shard"] == thinned, "path"]) - {survivor["path"]}
    second, written = stored(
        tmp_path / "two", [f for f in files if f[0] not in gone], previous=first, limit=12000
    )
    assert thinned not in set(second.index["shard"])
    # the cut shard's images were written again, from the source: the same bytes, whole
    assert second.shard_path(cut).stat().st_size > 2048
    assert second.shard_path(cut).stat().st_ino != first.shard_path(cut).stat().st_ino
    for key, _, source in files:
        if key not in gone:
            assert second.read_bytes(key) == source.read_bytes(), key


def test_an_unknown_path_and_a_truncated_shard_are_one_line_errors(tmp_path):
    images = colour_images(tmp_path / "images", per_class=3)
    store, _ = stored(tmp_path / "raw", files_of(images))
    with pytest.raises(DataError, match=r"raw/red/nope.png is not in the raw store .*1 missing"):
        store.locate([store.logical("red/img_00.png"), store.logical("red/nope.png")])
    (shard,) = (tmp_path / "raw" / rawstore.SHARDS).iterdir()
    last = store.index.sort_values("offset").iloc[-1]
    shard.write_bytes(shard.read_bytes()[: int(last["offset"]) + 10])
    with pytest.raises(DataError, match=f"{last['path']}: its shard .* ends before its bytes"):
        store.read_bytes(last["path"])
    with pytest.raises(DataError, match="does not exist: run the download stage first"):
        RawStore.open(tmp_path / "nowhere")


@pytest.mark.slow
def test_a_grown_dataset_pushes_and_pulls_only_its_new_shard(tmp_path, monkeypatch, caplog):
    """The distributed data bus (``flows.databus``) between a machine that runs download
    and one that runs validate, through a real S3 API server: after the data grew, only
    the new shard, the index's new segment and DVC's listing of the folder travel."""
    images = colour_images(tmp_path / "images", per_class=10)
    repo = make_repo(tmp_path / "repo", images)
    worker = tmp_path / "worker"
    shards, index = repo / "data/raw" / rawstore.SHARDS, repo / "data/raw" / rawstore.INDEX
    (tmp_path / "s3").mkdir()
    with s3_server(tmp_path / "s3") as s3:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        dvc(repo, "remote", "add", "-d", "bus", f"s3://{s3.bucket}/store")
        dvc(repo, "remote", "modify", "bus", "endpointurl", s3.endpoint)
        git(repo, "commit", "-qam", "the data bus")
        git(tmp_path, "clone", "-q", str(repo), str(worker))

        def run_download() -> tuple[int, set[str], set[str]]:
            """download here, its outputs pushed; validate's inputs checked out there: the
            bytes sent, the objects the remote gained and those the worker's cache did."""
            dvc(repo, "repro", "download")
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", "a run")
            before = s3.keys()
            monkeypatch.chdir(repo)  # where a flow runs them: DVC names stages from there
            sent = push_outputs(repo, ["download"])["download"]
            git(worker, "pull", "-q")
            cached = set(cache_objects(worker / ".dvc/cache"))
            monkeypatch.chdir(worker)
            check_out_inputs(worker, ["validate"])
            return sent, s3.keys() - before, set(cache_objects(worker / ".dvc/cache")) - cached

        run_download()
        first = {p.name for p in shards.iterdir()}
        first_index = {p.name for p in index.iterdir()}
        colour_images(images, per_class=3, start=10, classes=("red",))
        sent, pushed, pulled = run_download()
        # a machine that runs download next is given the last store to extend
        other = tmp_path / "other"
        git(tmp_path, "clone", "-q", str(repo), str(other))
        monkeypatch.chdir(other)
        check_out_inputs(other, ["download"])
        # where the remote has lost it, the stage goes on without it (it writes it whole)
        bare = tmp_path / "bare"
        git(tmp_path, "clone", "-q", str(repo), str(bare))
        client = s3.client()
        for key in s3.keys():
            client.delete_object(Bucket=s3.bucket, Key=key)
        monkeypatch.chdir(bare)
        with caplog.at_level(logging.WARNING, logger="flows.databus"):
            check_out_inputs(bare, ["download"])
        assert "stage download: its last data/raw cannot be had" in caplog.text

    now = {p.name for p in shards.iterdir()}
    (added,) = now - first
    assert first < now  # the first run's shards are kept as they were
    with tarfile.open(shards / added) as tar:
        assert len(tar.getnames()) == 3  # the new images only
    (segment,) = {p.name for p in index.iterdir()} - first_index
    assert first_index < {p.name for p in index.iterdir()}
    assert pd.read_parquet(index / segment)["path"].str.startswith("red/").sum() == 3
    assert sent == (shards / added).stat().st_size + (index / segment).stat().st_size
    assert len(pushed) == len(pulled) == 3  # the shard, the segment, the folder's listing
    assert sum(p.endswith(".dir") for p in pushed) == sum(p.endswith(".dir") for p in pulled) == 1
    assert {Path(p).stat().st_size for p in pulled if not p.endswith(".dir")} == {
        (shards / added).stat().st_size,
        (index / segment).stat().st_size,
    }
    extended = other / "data/raw"
    assert {p.name for p in (extended / rawstore.INDEX).iterdir()} == {
        p.name for p in index.iterdir()
    }
    assert {p.name for p in (extended / rawstore.SHARDS).iterdir()} == now
    store = RawStore.open(worker / "data/raw")
    assert len(store.index) == 33
    for path in sorted(images.rglob("*.png")):
        assert store.read_bytes(path.relative_to(images).as_posix()) == path.read_bytes()
