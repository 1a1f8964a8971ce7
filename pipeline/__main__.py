"""``python -m pipeline <stage>``: run one stage with the settings in params.yaml.

This is the command dvc.yaml runs for each stage; the stage modules do the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import time

from pipeline.config import PARAMS_FILE, load_params
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

# Stage name → module; the order of stages lives in dvc.yaml, not here.
STAGES = ("download", "validate", "split", "features", "train_head", "finetune", "evaluate")


def run_stage(stage: str, params_file: str = str(PARAMS_FILE)) -> dict:
    """Run ``stage`` as a plain function call, reading ``params_file`` once."""
    if stage not in STAGES:
        raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    params = load_params(params_file)
    module = importlib.import_module(f"pipeline.{stage}")
    return module.main(params)


def describe_outputs(params_file: str = str(PARAMS_FILE)) -> str:
    """Where each output of the pipeline lives, from params.yaml's ``paths`` section."""
    paths = load_params(params_file).paths
    rows = [(f.name, getattr(paths, f.name)) for f in dataclasses.fields(paths)]
    return "\n".join(f"  {name:<16} {path}{'/' if path.is_dir() else ''}" for name, path in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument(
        "stage", choices=(*STAGES, "outputs"), help="a stage, or 'outputs' to list paths"
    )
    parser.add_argument(
        "--params", default=str(PARAMS_FILE), help="params file (default: %(default)s)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    started = time.perf_counter()
    try:
        if args.stage == "outputs":
            sys.stdout.write(describe_outputs(args.params) + "\n")
            return 0
        run_stage(args.stage, args.params)
    except PipelineError as exc:
        log.error("%s failed: %s", args.stage, exc)
        return 1
    except KeyboardInterrupt:
        log.error("%s interrupted; nothing was committed", args.stage)
        return 130
    log.info("%s finished in %.1f s", args.stage, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
