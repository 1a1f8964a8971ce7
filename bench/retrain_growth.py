"""What a retraining run costs as the data grows: the source fingerprint, the first run,
a no-op and a run after 1% more images (issue #36), through ``--through`` (default
``features``: the data stages and the embeddings).

The images are ``--images`` generated distinct JPEGs in ``--classes`` class folders, or
the class folders of ``--folder`` (e.g. Caltech-101 extracted) copied in. Every 100th image
of each class is held back for the first run and put back for the +1% run, so the growth
is spread over the classes as new data usually is. Times, in a project of this checkout:

1. ``source_fingerprint`` in this process (``--repeat`` times, the OS cache warm);
2. the first ``dvc repro <through>``, with each stage's seconds from its run log;
3. a no-op ``dvc repro <through>`` (``--repeat`` times): nothing but the fingerprint runs;
4. ``dvc repro <through>`` after the held-back 1% is added: each stage's seconds, and how
   many files download reused, images validate decoded and features computed.

    python bench/retrain_growth.py --root /tmp/growth --images 100000
    python bench/retrain_growth.py --root /tmp/growth-caltech --folder CALTECH_FOLDER
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dvc_overhead import stage_logs  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.sources.fingerprint import source_fingerprint  # noqa: E402
from pipeline.system.cpu import cpu_info  # noqa: E402
from tests.support.project import copy_project, git, set_params, tool_env  # noqa: E402

DATA_STAGES = ("fingerprint", "download", "validate", "split", "features")


def _write_class(job: tuple[Path, int, int, int]) -> None:
    folder, label, count, side = job
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label)
    for i in range(count):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((side * 4 // 3, side), Image.Resampling.BICUBIC)
        image.save(folder / f"img_{i:07d}.jpg", quality=85)


def generate(folder: Path, images: int, classes: int, side: int) -> None:
    """``images`` distinct JPEGs (smooth colour fields, ``side`` px high) in ``classes``
    folders, written by every core."""
    per_class = [images // classes + (c < images % classes) for c in range(classes)]
    jobs = [(folder / f"class_{c:03d}", c, n, side) for c, n in enumerate(per_class)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_class, jobs))


def hold_back(images: Path, held: Path) -> int:
    """Move every 100th file of each class (by name) from ``images`` to ``held``."""
    moved = 0
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir())[50::100]:
            (held / folder.name).mkdir(parents=True, exist_ok=True)
            path.rename(held / folder.name / path.name)
            moved += 1
    return moved


def put_back(held: Path, images: Path) -> None:
    for path in sorted(held.rglob("*")):
        if path.is_file():
            path.rename(images / path.relative_to(held))


def repro(repo: Path, through: str) -> tuple[float, list[str]]:
    started = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro", through], cwd=repo, env=tool_env(), capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(
            f"dvc repro {through} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    ran = [
        line.split("'")[1]
        for line in done.stdout.splitlines()
        if line.startswith("Running stage '")
    ]
    return seconds, ran


def timed_run(repo: Path, through: str) -> dict:
    """One ``dvc repro``: its wall seconds and each stage's (in the stage, and its
    process's start-up); the rest of the wall time is DVC's."""
    wall, ran = repro(repo, through)
    logs = stage_logs(repo, ran)
    in_stages = sum((e["seconds"] or 0) + (e["startup_seconds"] or 0) for e in logs.values())
    return {
        "wall_s": round(wall, 1),
        "stages_ran": ran,
        "stage_s": {
            s: round((e["seconds"] or 0) + (e["startup_seconds"] or 0), 1) for s, e in logs.items()
        },
        "dvc_s": round(wall - in_stages, 1),
    }


def metric(repo: Path, stage: str, key: str):
    return json.loads((repo / "metrics" / f"{stage}.json").read_text()).get(key)


def growth_parser(doc: str, images: int) -> argparse.ArgumentParser:
    """The options of a benchmark on ``--images`` generated images in a fresh ``--root``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a folder to work in (emptied)")
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--side", type=int, default=48, help="generated images' height, px")
    parser.add_argument("--repeat", type=int, default=3)
    return parser


def emptied(root: Path) -> Path:
    """``root``, made anew and empty: a benchmark starts from nothing."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root


def main() -> None:
    parser = growth_parser(__doc__, images=100_000)
    parser.add_argument("--folder", type=Path, help="class folders to copy instead of generating")
    parser.add_argument("--through", default="features", choices=DATA_STAGES[1:])
    args = parser.parse_args()
    emptied(args.root)
    images, held, repo = args.root / "images", args.root / "held", args.root / "repo"
    results: dict = {"cpu": cpu_info().model, "cores": os.cpu_count(), "through": args.through}

    started = time.perf_counter()
    if args.folder:
        shutil.copytree(args.folder, images)
    else:
        generate(images, args.images, args.classes, args.side)
    results["prepare_s"] = round(time.perf_counter() - started, 1)
    results["held_back"] = hold_back(images, held)
    results["images_first"] = sum(1 for p in images.rglob("*") if p.is_file())

    copy_project(repo)
    set_params(repo, data={"source": str(images)})
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    params = load_params(repo / "params.yaml")
    seconds = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        source_fingerprint(params.data, params.download, repo)
        seconds.append(time.perf_counter() - t)
    results["fingerprint_in_process_s"] = [round(s, 3) for s in seconds]

    results["first"] = timed_run(repo, args.through)
    noop = []
    for _ in range(args.repeat):
        wall, ran = repro(repo, args.through)
        assert ran == ["fingerprint"], ran
        noop.append(round(wall, 2))
    results["noop_s"] = {"runs": noop, "median": statistics.median(noop)}

    put_back(held, images)
    grown = timed_run(repo, args.through)
    grown["download_reused"] = metric(repo, "download", "reused")
    grown["download_files"] = metric(repo, "download", "files")
    if args.through in ("validate", "split", "features"):
        grown["validate_decoded"] = metric(repo, "validate", "decoded")
    if args.through == "features":
        grown["features_computed"] = metric(repo, "features", "computed")
    grown["of_first_wall"] = round(grown["wall_s"] / results["first"]["wall_s"], 3)
    results["plus_1pct"] = grown
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
