"""``python -m flows run`` runs the flow once; ``python -m flows serve`` serves it on a schedule.

``run`` needs no server (Prefect's ephemeral mode, unless ``PREFECT_API_URL`` points at
one). ``serve`` creates the deployment ``training-pipeline/scheduled`` with the cron
schedule in params.yaml (``flows.cron``) and runs its flow runs until stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

# Before Prefect is imported: its telemetry tries DNS (offline here) and its ephemeral
# server needs more than the default 20 s to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

DEPLOYMENT = "scheduled"


def parse_overrides(items: list[str]) -> dict:
    """``head.lr=0.0005`` → ``{"head.lr": 0.0005}`` (values read as YAML scalars)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. head.lr=0.0005), got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the flow once, here")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml key for this run (saved as a DVC experiment)",
    )
    run.add_argument(
        "--push",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dvc push after the run (default: flows.push)",
    )
    run.add_argument("--workspace", default=".", help="the repository to run in")
    commands.add_parser("serve", help=f"serve the deployment training-pipeline/{DEPLOYMENT}")
    args = parser.parse_args(argv)

    from prefect.schedules import Cron

    from flows.training import training_pipeline
    from pipeline.config import load_params

    if args.command == "run":
        state = training_pipeline(
            overrides=parse_overrides(args.set),
            push=args.push,
            workspace=args.workspace,
            return_state=True,
        )
        sys.stdout.write(f"training-pipeline: {state.name} {state.message or ''}".rstrip() + "\n")
        return 0 if state.is_completed() else 1
    cfg = load_params().flows
    training_pipeline.serve(
        name=DEPLOYMENT,
        schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
        description="Nightly `dvc repro` of the pipeline; DVC skips what is up to date.",
        tags=["transfer-pipeline"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
