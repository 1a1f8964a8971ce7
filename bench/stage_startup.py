"""Each stage's start-up in a workspace: process start to the stage ready to work.

A fresh ``WS/.venv/bin/python`` (the workspace's own code and packages; this Python where
the workspace has no .venv) reads params.yaml and imports ``pipeline.stages.<stage>``, as
``python -m pipeline <stage>`` does before the stage's ``main``, then prints the time; the
start-up is that time less the time just before the process was started (the run log's
``startup_seconds`` is the same span, read from /proc inside the stage). The same probe
works on any commit with ``pipeline.config.load_params`` and ``pipeline.stages``, so a
workspace from before the run log recorded ``startup_seconds`` can be measured beside one
from after. Stages are measured in turn, ``--repeat`` times each.

    python bench/stage_startup.py --root WS [--root WS2 ...] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("train_head", "finetune", "evaluate", "export", "onnx_check", "report")
PROBE = """
import importlib, sys, time
from pipeline.config import load_params
load_params("params.yaml")
importlib.import_module("pipeline.stages." + sys.argv[1])
print(time.time())
"""


def startup_seconds(root: Path, stage: str) -> float:
    """One fresh process's start-up for ``stage`` in workspace ``root``."""
    own = root / ".venv/bin/python"
    started = time.time()
    done = subprocess.run(
        [str(own) if own.exists() else sys.executable, "-c", PROBE, stage],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return round(float(done.stdout) - started, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, action="append", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stage", action="append", choices=STAGES)
    args = parser.parse_args()
    roots = [root.resolve() for root in args.root]
    result = {str(root): {} for root in roots}
    for stage in args.stage or STAGES:
        for _ in range(args.repeat):
            for root in roots:  # the workspaces alternate
                result[str(root)].setdefault(stage, []).append(startup_seconds(root, stage))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
