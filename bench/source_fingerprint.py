"""What it costs to see whether a large folder source changed: the fingerprint and a
no-op ``dvc repro`` of fingerprint + download, at 100k images.

Generates ``--images`` tiny distinct files (the fingerprint reads sizes and times, never
pixels, so their content does not matter; download copies them as they are) in
``--classes`` class folders, makes a project of this checkout on it, and times:

1. ``source_fingerprint`` in this process (``--repeat`` times, the OS cache warm);
2. ``python -m pipeline fingerprint`` (a process, as DVC starts it);
3. the first ``dvc repro download`` (fingerprint, download, DVC hashing data/raw);
4. a no-op ``dvc repro download`` (``--repeat`` times): download must not run;
5. ``dvc repro download`` after 1% more images: download must run.

    python bench/source_fingerprint.py --root /tmp/fp-bench [--images 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.sources.fingerprint import source_fingerprint  # noqa: E402
from tests.support.project import copy_project, git, set_params, tool_env  # noqa: E402


def generate(folder: Path, images: int, classes: int, start: int = 0) -> None:
    """``images`` distinct tiny ``.png`` files spread over ``classes`` folders."""
    for i in range(start, start + images):
        target = folder / f"class_{i % classes:03d}" / f"img_{i:07d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(i.to_bytes(8, "little") * 4)


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    models = [
        line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
    ]
    return models[0] if models else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="an empty folder to work in")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.root.exists():
        shutil.rmtree(args.root)
    args.root.mkdir(parents=True)
    images, repo = args.root / "images", args.root / "repo"
    results: dict = {"images": args.images, "cpu": cpu_model(), "cores": os.cpu_count()}

    started = time.perf_counter()
    generate(images, args.images, args.classes)
    results["generate_s"] = round(time.perf_counter() - started, 2)

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
    results["fingerprint_function_s"] = [round(s, 3) for s in seconds]
    results["fingerprint_stage_process_s"] = round(
        timed([sys.executable, "-m", "pipeline", "fingerprint"], repo)[0], 2
    )

    first, _ = timed(["dvc", "repro", "download"], repo)
    results["first_repro_download_s"] = round(first, 1)
    noop = []
    for _ in range(args.repeat):
        seconds, out = timed(["dvc", "repro", "download"], repo)
        assert "Running stage 'download'" not in out, out
        noop.append(seconds)
    results["noop_repro_fingerprint_download_s"] = [round(s, 2) for s in noop]
    results["noop_median_s"] = round(statistics.median(noop), 2)

    generate(images, args.images // 100, args.classes, start=args.images)
    seconds, out = timed(["dvc", "repro", "download"], repo)
    assert "Running stage 'download'" in out, out
    results["plus_1pct_repro_download_s"] = round(seconds, 1)
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
