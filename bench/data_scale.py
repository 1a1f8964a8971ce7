"""The data stages as the dataset grows (issue #38): N generated distinct JPEGs in C
classes through ``dvc repro split``, then a no-op, ``dvc push`` of everything to a local S3
API server (moto), ``dvc pull`` into a fresh clone, and a +1% run with its push. Each figure
with what it grows with: files, bytes, seconds, peak RSS per stage from the run logs, and
validate's decoding rate per core.

    python bench/data_scale.py --root /tmp/scale10k --images 10000

Prints JSON. The S3 server and the clone live under ``--root`` (emptied first).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dvc_overhead import stage_logs  # noqa: E402
from bench.retrain_growth import (  # noqa: E402
    emptied,
    generate,
    growth_parser,
    hold_back,
    metric,
    put_back,
    repro,
    timed_run,
)
from pipeline.system.cpu import cpu_info  # noqa: E402
from tests.support.project import copy_project, git, set_params, tool_env  # noqa: E402
from tests.support.s3 import s3_server  # noqa: E402

THROUGH = "split"


def dvc(repo: Path, *args: str, env: dict[str, str]) -> float:
    """``dvc *args`` in ``repo``; its wall seconds (a failure stops the benchmark)."""
    started = time.perf_counter()
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(
            f"dvc {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return round(time.perf_counter() - started, 1)


def bucket_size(s3) -> tuple[int, int]:
    """Objects and bytes in the remote's bucket."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
    sizes = [obj["Size"] for page in pages for obj in page.get("Contents", [])]
    return len(sizes), sum(sizes)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# the outputs a growth adds files to: the store's shards, and the segmented tables
GROWING = {
    "shards": "data/raw/shards",
    "index": "data/raw/index",
    "manifest": "data/manifest",
    "splits": "data/splits",
}


def files_in(repo: Path) -> dict[str, dict[tuple[str, int], int]]:
    """(name, inode) → size of each file of each ``GROWING`` folder: a kept file is linked
    (the same inode), a rewritten one is new even where its name is not."""
    return {
        name: {(p.name, p.stat().st_ino): p.stat().st_size for p in (repo / folder).iterdir()}
        for name, folder in GROWING.items()
    }


def added(before: dict, after: dict) -> dict:
    """Bytes of the files each ``GROWING`` folder gained (what a push of it sends)."""
    return {
        name: sum(size for file, size in after[name].items() if file not in before[name])
        for name in GROWING
    }


def peaks(repo: Path, stages: list[str]) -> dict[str, float]:
    return {s: e["peak_rss_mb"] for s, e in stage_logs(repo, stages).items()}


def main() -> None:
    args = growth_parser(__doc__, images=10_000).parse_args()
    emptied(args.root)
    images, held, repo = args.root / "images", args.root / "held", args.root / "repo"
    cores = os.cpu_count() or 1
    results: dict = {"cpu": cpu_info().model, "cores": cores, "images": args.images}

    generate(images, args.images, args.classes, args.side)
    results["held_back"] = hold_back(images, held)
    results["image_bytes"] = folder_bytes(images)

    with s3_server(Path(tempfile.mkdtemp(dir=args.root))) as s3:
        env = {**tool_env(), **s3.env()}
        copy_project(repo)
        set_params(repo, data={"source": str(images)})
        git(repo, "init", "-q")
        for command in (
            ["remote", "add", "-d", "bus", f"s3://{s3.bucket}/dvc"],
            ["remote", "modify", "bus", "endpointurl", s3.endpoint],
        ):
            dvc(repo, *command, env=env)
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "project")

        first = timed_run(repo, THROUGH)
        first["peak_rss_mb"] = peaks(repo, first["stages_ran"])
        decoded = metric(repo, "validate", "decoded")
        validate_s = first["stage_s"].get("validate") or 0
        first["validate_img_per_s_per_core"] = round(decoded / validate_s / cores, 1)
        results["first"] = first
        noop = []
        for _ in range(args.repeat):
            wall, ran = repro(repo, THROUGH)
            assert ran == ["fingerprint"], ran
            noop.append(round(wall, 2))
        results["noop_s"] = {"runs": noop, "median": statistics.median(noop)}
        results["dvc_cache_files"] = sum(
            1 for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()
        )
        results["disk_bytes"] = {
            "source": results["image_bytes"],
            "workspace_raw": folder_bytes(repo / "data" / "raw"),
            "dvc_cache": folder_bytes(repo / ".dvc" / "cache"),
        }
        results["store"] = metric(repo, "download", "store")

        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "first run")
        results["push_s"] = dvc(repo, "push", env=env)
        objects, stored = bucket_size(s3)
        results["pushed"] = {"objects": objects, "bytes": stored}

        clone = args.root / "clone"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
        results["pull_s"] = dvc(clone, "pull", "--with-deps", THROUGH, env=env)

        put_back(held, images)
        before = files_in(repo)
        grown = timed_run(repo, THROUGH)
        new_files = added(before, files_in(repo))
        grown["peak_rss_mb"] = peaks(repo, grown["stages_ran"])
        grown["of_first_wall"] = round(grown["wall_s"] / first["wall_s"], 3)
        grown["store"] = metric(repo, "download", "store")
        results["plus_1pct"] = grown
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "+1%", "--allow-empty")
        push_s = dvc(repo, "push", env=env)
        objects_after, stored_after = bucket_size(s3)
        results["plus_1pct_push"] = {
            "seconds": push_s,
            "objects": objects_after - objects,
            "bytes": stored_after - stored,
            "of_first_push_bytes": round((stored_after - stored) / stored, 4),
            # the new files in the workspace, per output (the rest: DVC's folder listings,
            # the metrics DVC caches)
            "new_file_bytes": new_files,
            "raw_store_of_first_push_bytes": round(
                (new_files["shards"] + new_files["index"]) / stored, 4
            ),
        }
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
