"""Disk full (RELIABILITY.md, issue #7 item 3): a real, small tmpfs fills during download,
extraction and features.

The tmpfs is mounted in a private user + mount namespace (``unshare -rm``), so nothing
outside the test changes; the stage runs there as ``python -m pipeline <stage>``. Each
trial runs the stage on a tmpfs too small for it, then grows the same tmpfs (``mount -o
remount,size=``) and runs it again. Expected: the first run exits 1 with an error that
says the disk is full (ENOSPC), names the file and the params.yaml key that moves it;
nothing half-written is kept (the stage's output is absent or as before, no temporary
file or folder remains; the only leftover allowed is a download's ``.part`` with its
``.part.json``, on purpose: it is a prefix of the file and the next run resumes from it);
the second run completes with the correct outputs.

Sizes are drawn from ``random.Random(SEED)`` (``PIPELINE_FAULTS_SEED`` to replay).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.featurestore import load_features
from pipeline.stages import download, features
from tests.support.faults import SEED, run_trials, trials
from tests.support.httpserver import ServedFiles, etag_of
from tests.support.images import noise_image
from tests.support.project import REPO_ROOT, params_from, raw_files
from tests.support.project import write_params as write_params_file
from tests.support.world import TinyWorld

pytestmark = pytest.mark.faults

PAGE = 4096  # tmpfs allocates whole pages


@pytest.fixture(scope="module")
def tmpfs_works(tmp_path_factory) -> None:
    """Skip unless a tmpfs can be mounted in a user + mount namespace here."""
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux unshare to mount a private tmpfs")
    folder = tmp_path_factory.mktemp("probe")
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {folder}"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {done.stderr.strip()}")


@dataclass
class Run:
    returncode: int
    stderr: str
    after: Path  # copies of the workspace's ``keep`` paths as the run left them


def stage_on_growing_tmpfs(
    stage: str, folder: Path, sizes_kib: list[int], keep: list[str], out: Path
) -> list[Run]:
    """Run ``python -m pipeline <stage>`` in the current folder (a workspace) once per size,
    with ``folder`` on one tmpfs grown to each size in turn: what a run leaves there stays
    for the next. Whatever ``folder`` holds beforehand is copied onto the tmpfs first.
    After each run the workspace paths ``keep`` are copied out, to be checked.
    """
    out.mkdir(parents=True)
    seed = out / "before"
    shutil.copytree(folder, seed, symlinks=True)
    q = shlex.quote
    cmd = " ".join(q(a) for a in (sys.executable, "-m", "pipeline", stage))
    lines = [
        "set -e",
        f"mount -t tmpfs -o size={sizes_kib[0]}k tmpfs {q(str(folder))}",
        f"cp -a {q(str(seed))}/. {q(str(folder))}/",
    ]
    for i, size in enumerate(sizes_kib):
        if i:
            lines.append(f"mount -o remount,size={size}k {q(str(folder))}")
        lines += [
            f"{cmd} 2> {q(f'{out}/{i}.err')} && rc=0 || rc=$?",
            f"echo $rc > {q(f'{out}/{i}.rc')}",
            f"mkdir {q(f'{out}/{i}')}",
            *(f"cp -a --parents {q(path)} {q(f'{out}/{i}')}/" for path in keep),
        ]
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "\n".join(lines)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return [
        Run(int((out / f"{i}.rc").read_text()), (out / f"{i}.err").read_text(), out / f"{i}")
        for i in range(len(sizes_kib))
    ]


def kib_on_tmpfs(files: list[int]) -> int:
    """KiB that files of these sizes take on a tmpfs."""
    return sum(-(-size // PAGE) for size in files) * PAGE // 1024


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root``, hidden ones included (relative path → sha256)."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def hidden(root: Path) -> list[str]:
    """Temporary files and folders (the stages name them ``.<name>.tmp-<pid>`` and
    ``.<stage>-<random>``) anywhere under ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*"))


def images(seed: int, classes: dict[str, int], root: Path) -> Path:
    """Distinct 64x48 noise PNGs (about 9 kB each: a few make an archive of some size)."""
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            noise_image(seed * 1000 + c * 100 + i, (64, 48)).save(root / name / f"{i:02d}.png")
    return root


def tar_gz(folder: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname="images")
    return dest


def same_images(raw: Path, source: Path) -> bool:
    """The raw store at ``raw`` holds exactly the files under ``source``."""
    stored = {key: hashlib.sha256(data).hexdigest() for key, data in raw_files(raw).items()}
    return stored == tree(source)


@pytest.fixture
def disk_ws(tmp_path, monkeypatch) -> Path:
    """An empty workspace (the working directory) for a stage to fill a disk in."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    return ws


def write_params(params: dict) -> None:
    """A complete params.yaml in the workspace: the repository's with ``params`` over it."""
    write_params_file(Path("params.yaml"), **params)


def test_disk_full_during_download_keeps_a_resumable_part(tmpfs_works, disk_ws, tmp_path):
    previous = images(1, {"fish": 3}, tmp_path / "previous")
    new = images(2, {"cat": 12, "dog": 12, "bird": 12}, tmp_path / "new")
    payload = tar_gz(new, tmp_path / "new.tgz").read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    size_kib = len(payload) // 1024
    runs = itertools.count()
    rng = random.Random(SEED)
    cases = [rng.randint(size_kib // 5, size_kib * 4 // 5) for _ in range(trials(5))]
    downloads = disk_ws / "data" / "downloads"
    name = f"{digest[:16]}-new.tgz"

    def trial(small_kib: int) -> str | None:
        i = next(runs)
        shutil.rmtree(downloads, ignore_errors=True)
        downloads.mkdir(parents=True)
        download.main(params_from({"data": {"source": str(previous)}}))
        before = {"raw": tree(Path("data/raw")), "metrics": tree(Path("metrics"))}
        with ServedFiles({"/new.tgz": payload}) as server:
            write_params({"data": {"source": server.url("/new.tgz"), "sha256": digest}})
            full, roomy = stage_on_growing_tmpfs(
                "download",
                downloads,
                [small_kib, 2 * size_kib + 256],
                ["data", "metrics"],
                tmp_path / f"t{i}",
            )
        # First run: a clear error, data/raw untouched, only the resumable part kept.
        kept = sorted(p.name for p in (full.after / "data/downloads").iterdir())
        part = full.after / f"data/downloads/{name}.part"
        after = {"raw": tree(full.after / "data/raw"), "metrics": tree(full.after / "metrics")}
        assert full.returncode != 0, "the download fitted on the small disk"
        if after != before or (full.after / f"data/downloads/{name}").exists():
            return "data lost"  # an incomplete file where only a verified one may be
        assert full.returncode == 1, full.stderr
        assert (
            f"download failed: disk full (ENOSPC): no space left on device writing "
            f"data/downloads/{name}.part"
        ) in full.stderr, full.stderr
        assert "the next run resumes there" in full.stderr and "paths.downloads" in full.stderr
        assert kept == [f"{name}.part", f"{name}.part.json"], kept
        assert 0 < part.stat().st_size < len(payload) and payload.startswith(part.read_bytes())
        assert not hidden(full.after / "data"), hidden(full.after / "data")
        # Second run, with room: resumes where the first stopped, ends with the new images.
        assert roomy.returncode == 0, roomy.stderr
        assert server.seen[1].headers["Range"] == f"bytes={part.stat().st_size}-"
        assert server.seen[1].headers["If-Range"] == etag_of(payload)
        assert server.answers == [200, 206]
        assert tree(roomy.after / "data/downloads") == {name: digest}
        assert same_images(roomy.after / "data/raw", new)
        assert not hidden(roomy.after / "data")
        return None

    failures = run_trials("disk full during download (tmpfs on paths.downloads)", cases, trial)
    assert not failures, failures


def test_disk_full_during_extraction_keeps_the_previous_raw(tmpfs_works, disk_ws, tmp_path):
    previous = images(3, {"fish": 3}, tmp_path / "previous")
    new = images(4, {"cat": 12, "dog": 12, "bird": 12}, tmp_path / "new")
    archive = tar_gz(new, tmp_path / "new.tgz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    data = disk_ws / "data"
    # What the tmpfs must hold: the previous data/raw, then the new one (moved, not copied,
    # out of the folder the archive unpacks to).
    old_kib = kib_on_tmpfs([p.stat().st_size for p in previous.rglob("*.png")])
    new_kib = kib_on_tmpfs([p.stat().st_size for p in new.rglob("*.png")])
    runs = itertools.count()
    rng = random.Random(SEED + 1)
    cases = [old_kib + new_kib * rng.randint(10, 90) // 100 for _ in range(trials(5))]

    def trial(small_kib: int) -> str | None:
        i = next(runs)
        shutil.rmtree(data, ignore_errors=True)
        download.main(params_from({"data": {"source": str(previous)}}))
        before = tree(data / "raw")
        write_params({"data": {"source": str(archive), "sha256": digest}})
        full, roomy = stage_on_growing_tmpfs(
            "download",
            data,
            [small_kib, 2 * (old_kib + new_kib) + 512],
            ["data"],
            tmp_path / f"t{i}",
        )
        full.after, roomy.after = full.after / "data", roomy.after / "data"
        assert full.returncode != 0, "the archive fitted on the small disk"
        if tree(full.after / "raw") != before or hidden(full.after):
            return "data lost"  # a changed data/raw, or a half-extracted folder kept
        assert full.returncode == 1, full.stderr
        assert "download failed: disk full (ENOSPC): no space left on device writing data/" in (
            full.stderr
        ), full.stderr
        assert "paths.raw" in full.stderr
        assert roomy.returncode == 0, roomy.stderr
        assert same_images(roomy.after / "raw", new) and not hidden(roomy.after)
        return None

    failures = run_trials("disk full during extraction (tmpfs on data/)", cases, trial)
    assert not failures, failures


@pytest.fixture
def split_images(disk_ws, tmp_path, monkeypatch) -> dict:
    """A workspace whose download, validate and split stages have run on 3 x 10 small images,
    with the reference features computed where there is room (data/features); returns the
    params overrides it ran with."""
    world = TinyWorld.build(tmp_path, monkeypatch, images_per_class=10)
    world.run(features)
    return world.overrides


def test_disk_full_during_features_keeps_no_partial_output(
    tmpfs_works, disk_ws, tmp_path, split_images
):
    paths, reference, index, graphs, fs = features_on_fs(split_images, disk_ws)
    # The onnxruntime engine's graphs (~14 MB for Lite0, and its structure) are kept in the
    # memo; they are on the disk beforehand (test_disk_full_while_the_engine_graph_is_written
    # fills the disk with them). Then the stage reserves the features' files (~155 kB) and
    # writes a cache shard (~160 kB): little room fills while the features are reserved, more
    # while the cache is written.
    graph_kib = kib_on_tmpfs([g.stat().st_size for g in graphs.values()])
    runs = itertools.count()
    rng = random.Random(SEED + 2)
    cases = [rng.randrange(40, 300, 4) for _ in range(trials(5, 1))]

    def trial(small_kib: int) -> str | None:
        i = next(runs)
        shutil.rmtree(fs)
        for name, graph in graphs.items():
            (fs / "cache" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(graph, fs / "cache" / name)
        metrics_before = paths.metrics_file("features").read_text()
        full, roomy = stage_on_growing_tmpfs(
            "features",
            fs,
            [graph_kib + small_kib, graph_kib + 2048],
            ["fs", "metrics"],
            tmp_path / f"t{i}",
        )
        metrics = [roomy.after / "metrics/features.json", full.after / "metrics/features.json"]
        full.after, roomy.after = full.after / "fs", roomy.after / "fs"
        assert full.returncode != 0, "the features fitted on the small disk"
        if (full.after / "features").exists() or hidden(full.after):
            return "data lost"  # a partial output or a temporary file kept
        if metrics[1].read_text() != metrics_before:
            return "data lost"  # the failed run wrote its metrics
        shards = sorted((full.after / "cache").rglob("shard-*.npz"))
        for shard in shards:  # a shard that was kept is whole
            with np.load(shard) as kept:
                if not (len(kept["sha256"]) == len(kept["features"]) == 30):
                    return "data lost"
        assert full.returncode == 1, full.stderr
        assert "features failed: disk full (ENOSPC): no space left on device writing fs/" in (
            full.stderr
        ), full.stderr
        written = re.search(r"writing fs/(\w+)", full.stderr).group(1)
        setting = {"features": "paths.features", "cache": "paths.memo"}[written]
        assert f"point {setting} in params.yaml" in full.stderr, full.stderr
        assert roomy.returncode == 0, roomy.stderr
        computed = json.loads(metrics[0].read_text())["computed"]
        assert computed == (0 if shards else 30), computed  # a kept shard is reused
        for name, array in reference.items():
            assert np.allclose(np.load(roomy.after / "features" / f"{name}.npy"), array, atol=1e-5)
        assert json.loads((roomy.after / "features" / "index.json").read_text()) == index
        assert not hidden(roomy.after)
        return None

    failures = run_trials(
        "disk full during features (tmpfs on paths.features and memo)", cases, trial
    )
    assert not failures, failures


def features_on_fs(split_images: dict, workspace: Path):
    """The reference features run's paths, arrays, index and onnxruntime graphs (by path under
    the memo); then params that put ``paths.features`` and ``paths.memo``
    under the empty folder ``fs``."""
    paths = params_from(split_images).paths
    reference, index = load_features(paths)
    graphs = {
        g.relative_to(paths.memo).as_posix(): g
        for g in sorted((paths.memo / "graphs").rglob("*.onnx"))
    }
    assert len(graphs) == 4, graphs  # Normalise's and the backbone's, by content and structure
    write_params({**split_images, "paths": {"features": "fs/features", "memo": "fs/cache"}})
    fs = workspace / "fs"
    fs.mkdir()
    return paths, reference, index, graphs, fs


def test_disk_full_while_the_engine_graph_is_written(tmpfs_works, disk_ws, tmp_path, split_images):
    """The backbone's graph fills the disk: no partial graph is kept, the error names the file
    and the setting, and the next run with room exports it again and computes the features."""
    paths, reference, index, graphs, fs = features_on_fs(split_images, disk_ws)
    # The first large file written is the backbone's structure (its unoptimised export);
    # before it, Normalise's two small graphs.
    structure = max(
        (n for n in graphs if n.startswith("graphs/structures/")),
        key=lambda n: graphs[n].stat().st_size,
    )
    small = [g.stat().st_size for g in graphs.values() if g.stat().st_size < 1_000_000]
    room_kib = kib_on_tmpfs(small) + kib_on_tmpfs([graphs[structure].stat().st_size]) // 2
    all_kib = kib_on_tmpfs([g.stat().st_size for g in graphs.values()])
    metrics_before = paths.metrics_file("features").read_text()

    def trial(room_kib: int) -> str | None:
        full, roomy = stage_on_growing_tmpfs(
            "features", fs, [room_kib, all_kib + 2048], ["fs", "metrics"], tmp_path / "t"
        )
        kept = full.after / "fs"
        for graph in (kept / "cache").rglob("*.onnx"):  # each kept graph is whole
            name = graph.relative_to(kept / "cache").as_posix()
            if name not in graphs or graph.stat().st_size != graphs[name].stat().st_size:
                return "data lost"
        if hidden(kept) or (kept / "features").exists():
            return "data lost"  # a temporary file or partial features kept
        if (full.after / "metrics/features.json").read_text() != metrics_before:
            return "data lost"
        assert full.returncode == 1, full.stderr
        assert (
            f"features failed: disk full (ENOSPC): no space left on device writing "
            f"fs/cache/{structure}" in full.stderr
        ), full.stderr
        assert "point paths.memo in params.yaml" in full.stderr, full.stderr
        assert roomy.returncode == 0, roomy.stderr
        assert json.loads((roomy.after / "metrics/features.json").read_text())["computed"] == 30
        for name, graph in graphs.items():
            assert (roomy.after / "fs/cache" / name).stat().st_size == graph.stat().st_size
        for name, array in reference.items():
            saved = np.load(roomy.after / "fs/features" / f"{name}.npy")
            assert np.allclose(saved, array, atol=1e-5)
        assert json.loads((roomy.after / "fs/features/index.json").read_text()) == index
        assert not hidden(roomy.after / "fs")
        return None

    # One trial: the graph is one file written at once, so where the disk fills hardly matters.
    failures = run_trials(
        "disk full while the features engine's graph is written", [room_kib], trial
    )
    assert not failures, failures
