"""The memo layer (pipeline/system/memo.py, issue #41): one store per kind of derived work
kept by content, with one key rule, one damaged-entry rule, atomic writes and a bound."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import ConfigError
from pipeline.system import memo
from pipeline.system.diskfull import DiskFullError
from tests.support.project import repo_params

FILES = memo.Kind("files", 3, ".txt", redo="writing it again")
FOLDERS = memo.Kind("folders", 3)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def used_at(path: Path, seconds: int) -> None:
    os.utime(path, (seconds, seconds))


def test_digest_is_one_rule_for_every_spec():
    key = memo.digest({"backbone": "lite0", "pre": {"size": 224, "mean": [0.5]}})
    assert len(key) == memo.KEY_CHARS and int(key, 16) >= 0
    assert key == memo.digest({"pre": {"mean": [0.5], "size": 224}, "backbone": "lite0"})
    assert key != memo.digest({"backbone": "lite0", "pre": {"size": 256, "mean": [0.5]}})


def test_put_then_get_gives_the_entry_back(tmp_path):
    files, folders = memo.Store(tmp_path, FILES), memo.Store(tmp_path, FOLDERS)
    assert files.get("k", read_text) is None  # nothing kept yet
    path = files.put("k", lambda tmp: tmp.write_text("kept", encoding="utf-8"))
    assert path == tmp_path / "files" / "k.txt"
    assert files.get("k", read_text) == "kept"

    folders.put("k", lambda tmp: np.save(tmp / "a.npy", np.arange(3.0)))
    assert (tmp_path / "folders" / "k" / "a.npy").is_file()
    got = folders.get("k", lambda folder: np.load(folder / "a.npy"))
    assert got.tolist() == [0.0, 1.0, 2.0]


def test_a_damaged_entry_warns_naming_it_and_reads_as_missing(tmp_path, caplog):
    store = memo.Store(tmp_path, FOLDERS)
    store.put("k", lambda tmp: (tmp / "a.npy").write_bytes(b"not an array"))
    assert store.get("k", lambda folder: np.load(folder / "a.npy")) is None
    assert f"{tmp_path / 'folders' / 'k'} cannot be used" in caplog.text
    assert "making it again" in caplog.text  # the kind's redo

    files = memo.Store(tmp_path, FILES)
    files.put("k", lambda tmp: tmp.write_bytes(b"\xff\xfe"))
    assert files.get("k", read_text) is None
    assert f"{tmp_path / 'files' / 'k.txt'} cannot be used" in caplog.text
    assert "writing it again" in caplog.text


def test_eviction_keeps_the_most_recently_used(tmp_path):
    """A kind keeps its ``kept`` most recently used entries; reading one (get) touches it,
    so the oldest written but just used stays."""
    store = memo.Store(tmp_path, FOLDERS)
    for i in range(3):
        store.put(f"key{i}", lambda tmp: (tmp / "x").write_text("x"))
        used_at(store.path(f"key{i}"), 1_000 + i)
    assert store.get("key0", lambda folder: (folder / "x").read_text()) == "x"  # used now
    store.put("key3", lambda tmp: (tmp / "x").write_text("x"))
    assert sorted(p.name for p in store.folder.iterdir()) == ["key0", "key2", "key3"]


def test_eviction_counts_only_the_kinds_entries(tmp_path):
    """Another kind's folder inside (graphs/structures in graphs) and a writer's temporary
    folder are neither counted nor removed; a kind with ``kept`` None keeps everything."""
    files = memo.Store(tmp_path, FILES)
    memo.Store(tmp_path, memo.Kind("files/inner", 1, ".txt")).put("a", lambda t: t.write_text("a"))
    folders = memo.Store(tmp_path, FOLDERS)
    temporary = folders.folder / ".k9.tmp-1"
    temporary.mkdir(parents=True)
    used_at(temporary, 1)  # the oldest of all
    for store in (files, folders):
        for i in range(5):
            store.put(f"k{i}", lambda tmp: tmp.is_dir() or tmp.write_text("x"))
            used_at(store.path(f"k{i}"), 1_000 + i)
        store.evict()
    assert sorted(p.name for p in files.folder.iterdir()) == ["inner", "k2.txt", "k3.txt", "k4.txt"]
    assert sorted(p.name for p in folders.folder.iterdir()) == [".k9.tmp-1", "k2", "k3", "k4"]
    every = memo.Store(tmp_path, memo.Kind("every", None))
    for i in range(5):
        every.put(f"k{i}", lambda tmp: None)
    assert len(every.entries()) == 5


def test_a_writer_that_raises_leaves_no_entry_and_no_temporary(tmp_path):
    store = memo.Store(tmp_path, FOLDERS)
    store.put("k", lambda tmp: (tmp / "x").write_text("first"))

    def torn(tmp: Path) -> None:
        (tmp / "x").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        store.put("k", torn)
    with pytest.raises(RuntimeError, match="mid-write"):
        store.put("new", torn)
    assert [p.name for p in store.folder.iterdir()] == ["k"]  # no temporary, no "new"
    assert (store.path("k") / "x").read_text() == "first"

    def torn_file(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    files = memo.Store(tmp_path, FILES)
    with pytest.raises(RuntimeError, match="mid-write"):
        files.put("k", torn_file)
    assert list(files.folder.iterdir()) == []


def test_a_full_disk_names_paths_memo(tmp_path):
    store = memo.Store(tmp_path, FILES)

    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError, match="point paths.memo in params.yaml") as info:
        store.put("k", full)
    assert info.value.path == store.path("k")
    assert list(store.folder.iterdir()) == []


def test_shards_append_and_a_damaged_one_is_dropped(tmp_path, caplog):
    store = memo.Store(tmp_path, memo.Kind("shards", 2))

    def shard(values: list[int]):
        return lambda tmp: tmp.write_bytes(bytes(values))

    first = store.add_shard("k", [1, 2], shard([1, 2]))
    store.add_shard("k", [3], shard([3]))
    assert first.name.startswith("shard-") and first.suffix == ".npz"
    assert store.shards("k", lambda p: list(p.read_bytes())) == [[1, 2], [3]]

    def strict(path: Path) -> list[int]:
        if path == first:
            raise ValueError("torn")
        return list(path.read_bytes())

    assert store.shards("k", strict) == [[3]]
    assert f"{first} cannot be used (torn)" in caplog.text and not first.exists()
    assert store.shards("missing", strict) == []


def test_every_kind_has_its_own_folder_and_bound():
    folders = [kind.folder for kind in memo.KINDS]
    assert len(set(folders)) == len(folders)
    assert all(kind.kept is None or kind.kept > 0 for kind in memo.KINDS)
    declared = [v for v in vars(memo).values() if isinstance(v, memo.Kind)]
    assert set(declared) == set(memo.KINDS)


def test_the_renamed_key_says_its_new_name(tmp_path):
    """A params.yaml from before the memo still has paths.feature_cache: the error says in
    one line what it is called now."""
    raw = repo_params()
    paths = {("feature_cache" if k == "memo" else k): v for k, v in raw["paths"].items()}
    old = tmp_path / "params.yaml"
    old.write_text(yaml.safe_dump({**raw, "paths": paths}))
    with pytest.raises(ConfigError) as info:
        load_params(old)
    expected = f"{old}: 'paths.feature_cache' was renamed to 'paths.memo': rename it"
    assert str(info.value) == expected
