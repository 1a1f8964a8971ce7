"""DVC's own cost in a finished workspace: a no-op ``dvc repro``, and a head experiment.

1. ``dvc repro`` with nothing to do, ``--repeat`` times (DVC hashes nothing it has
   recorded: the cost is reading dvc.yaml/dvc.lock/params and stat-ing outputs).
2. A head experiment: with ``finetune.epochs: 0`` (prepared first, untimed), change
   ``head.lr`` and time ``dvc repro``: train_head and everything after it rerun, download,
   validate, split and features do not. Each rerun stage's seconds and peak RSS come from
   the run log, with each stage process's start-up (start to first work); the rest of the
   wall time is DVC's.

params.yaml is restored afterwards and a last ``dvc repro`` puts the workspace back: DVC's
run cache restores the outputs of the original params without recomputing, except
promote's (it has an uncached output, so every candidate reaches the model registry:
docs/registry.md) and the report after it: ``restore_original_params.stages_ran`` is
``["promote", "report"]``.

    python bench/dvc_overhead.py --root /path/to/finished/workspace
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.training import params_overridden  # noqa: E402
from pipeline.config import load_params  # noqa: E402


def dvc_stages(root: Path) -> list[str]:
    """The stages of ``root``'s dvc.yaml, in its order."""
    import yaml

    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def always_run(root: Path) -> set[str]:
    """The stages DVC runs every time (``always_changed``: the source fingerprint)."""
    import yaml

    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name for name, stage in stages.items() if stage.get("always_changed")}


def repro(root: Path) -> tuple[float, list[str]]:
    """Wall seconds of one ``dvc repro`` and the stages it ran (less those that run every
    time: their cost is in the wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro"],
        cwd=root,
        capture_output=True,
        text=True,
        env=os.environ | {"DVC_NO_ANALYTICS": "1"},
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"dvc repro failed in {root}:\n{done.stdout}\n{done.stderr}")
    ran = [
        line.split("'")[1]
        for line in done.stdout.splitlines()
        if line.startswith("Running stage '") and line.split("'")[1] not in always_run(root)
    ]
    return seconds, ran


def stage_logs(root: Path, stages: list[str]) -> dict[str, dict]:
    paths = load_params(root / "params.yaml").paths
    logs = {}
    for stage in stages:
        entry = json.loads((root / paths.run_log_file(stage)).read_text(encoding="utf-8"))
        keys = ("seconds", "startup_seconds", "peak_rss_mb", "peak_rss_children_mb")
        logs[stage] = {k: entry.get(k) for k in keys}
    return logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--lr",
        type=float,
        help="the head experiment's head.lr (default 0.0005, or 0.002 where that is set): a "
        "value this workspace has not run, or DVC's run cache restores it and nothing runs",
    )
    args = parser.parse_args()
    root = args.root.resolve()
    seconds, ran = repro(root)  # brings the workspace up to date first
    if ran:
        sys.stderr.write(f"the workspace was not up to date; ran {ran} first\n")
    noop = [repro(root)[0] for _ in range(args.repeat)]
    lr = load_params(root / "params.yaml").head.lr
    new_lr = args.lr or (0.0005 if lr != 0.0005 else 0.002)
    with params_overridden(root, {"finetune.epochs": 0}):
        repro(root)
    with params_overridden(root, {"finetune.epochs": 0, "head.lr": new_lr}):
        head_seconds, head_ran = repro(root)
        if "train_head" not in head_ran:
            raise SystemExit(f"head.lr {new_lr} was restored from DVC's run cache: pass --lr")
        logs = stage_logs(root, head_ran)
    restore_seconds, restore_ran = repro(root)
    in_stages = sum(entry["seconds"] or 0 for entry in logs.values())
    startup = sum(entry["startup_seconds"] or 0 for entry in logs.values())
    result = {
        "noop_repro_s": {
            "median": round(statistics.median(noop), 2),
            "min": round(min(noop), 2),
            "max": round(max(noop), 2),
            "runs": len(noop),
        },
        "head_lr_change": {
            "head.lr": f"{lr} -> {new_lr}",
            "wall_s": round(head_seconds, 1),
            "stages_ran": head_ran,
            "stages_not_ran": [s for s in dvc_stages(root) if s not in head_ran],
            "in_stages_s": round(in_stages, 1),
            "startup_s": round(startup, 1),  # the stages' processes, start to first work
            "dvc_s": round(head_seconds - in_stages - startup, 1),
            "per_stage": logs,
        },
        "restore_original_params": {
            "wall_s": round(restore_seconds, 1),
            "stages_ran": restore_ran,  # the rest restored from DVC's run cache
        },
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
