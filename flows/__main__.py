"""``python -m flows run`` runs the flow once; ``python -m flows serve`` serves it on a schedule.

``run`` needs no server (Prefect's ephemeral mode, unless ``PREFECT_API_URL`` points at
one). ``serve`` creates the deployment ``training-pipeline/scheduled`` with the cron
schedule in params.yaml (``flows.cron``) and the deployment ``source-sensor/watch``, which
every ``flows.sensor_interval_s`` seconds starts a training run when ``data.source``
changed (``flows/sensor.py``), and runs their flow runs until stopped. ``sense`` runs the
sensor once (against a server: ``PREFECT_API_URL``).
``crash-detection`` creates the server-side automation that marks a run Crashed when its
heartbeats stop (``serve`` does it too); workers started from prefect.yaml need it once.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path

import yaml

# Before Prefect is imported: its telemetry tries DNS (offline here) and its ephemeral
# server needs more than the default 20 s to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

DEPLOYMENT = "scheduled"
SENSOR_DEPLOYMENT = "watch"
ZOMBIE_AUTOMATION = "training-pipeline: crash runs whose heartbeats stopped"


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
    run.add_argument(
        "--distributed",
        action="store_true",
        help="run each stage on the work pool flows.pools names for its placement "
        "(deployments pipeline-stages/gpu and /cpu; data through the default DVC remote)",
    )
    serve_command = commands.add_parser(
        "serve",
        help=f"serve the deployments training-pipeline/{DEPLOYMENT} and "
        f"source-sensor/{SENSOR_DEPLOYMENT}",
    )
    serve_command.add_argument(
        "--replace",
        action="store_true",
        help="replace same-named deployments that `prefect deploy` made for a work pool",
    )
    sense = commands.add_parser(
        "sense", help="run the source sensor once: start a training run if data.source changed"
    )
    sense.add_argument("--workspace", default=".", help="the repository to fingerprint")
    commands.add_parser(
        "crash-detection", help="create the automation that marks silent runs Crashed"
    )
    args = parser.parse_args(argv)

    from pipeline.config import apply_overrides, load_params
    from pipeline.errors import ConfigError

    params_file = Path(getattr(args, "workspace", ".")) / "params.yaml"
    cfg = load_params(params_file).flows
    overrides = parse_overrides(args.set) if args.command == "run" else {}
    try:  # a bad --set fails here, in one line, before Prefect starts
        apply_overrides(params_file.read_text(encoding="utf-8"), overrides)
    except ConfigError as exc:
        raise SystemExit(f"python -m flows run: {exc}") from None
    # Before Prefect reads its settings: a run's process that dies (SIGKILL, OOM, a lost
    # machine) stops these heartbeats, and the automation marks the run Crashed.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(cfg.heartbeat_s))

    from prefect.schedules import Cron, Interval

    from flows.sensor import SENSOR_FLOW, source_sensor
    from flows.training import FLOW_NAME, training_pipeline

    if args.command == "sense":
        state = source_sensor(workspace=args.workspace, return_state=True)
        outcome = state.result() if state.is_completed() else state.message
        sys.stdout.write(f"source-sensor: {state.name} {outcome or ''}".rstrip() + "\n")
        return 0 if state.is_completed() else 1

    if args.command == "run":
        state = training_pipeline(
            overrides=overrides,
            push=args.push,
            workspace=args.workspace,
            distributed=args.distributed,
            return_state=True,
        )
        sys.stdout.write(f"training-pipeline: {state.name} {state.message or ''}".rstrip() + "\n")
        return 0 if state.is_completed() else 1
    ensure_crash_detection(cfg.zombie_after_s)
    if args.command == "crash-detection":
        return 0
    from prefect import serve

    names = [f"{FLOW_NAME}/{DEPLOYMENT}", f"{SENSOR_FLOW}/{SENSOR_DEPLOYMENT}"]
    if message := replace_pool_deployments(names, replace=args.replace):
        raise SystemExit(message)
    serve(
        training_pipeline.to_deployment(
            name=DEPLOYMENT,
            schedules=[Cron(cfg.cron, timezone=cfg.timezone)],
            description="Nightly `dvc repro` of the pipeline; DVC skips what is up to date.",
            tags=["transfer-pipeline"],
        ),
        source_sensor.to_deployment(
            name=SENSOR_DEPLOYMENT,
            schedules=[Interval(cfg.sensor_interval_s)],
            description="Starts training-pipeline/scheduled when data.source changed.",
            tags=["transfer-pipeline"],
        ),
    )
    return 0


def replace_pool_deployments(names: list[str], replace: bool) -> str | None:
    """The deployments of these names that ``prefect deploy`` made for a work pool: deleted
    with ``replace``, else the one-line refusal to serve (``None``: nothing in the way).

    ``serve`` would update such a deployment in place and keep its work pool and pull
    steps, so its runs would pull that deployment's code storage and crash; deleting one
    also deletes its scheduled runs, so it is never done unasked."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        found = []
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if deployment.work_pool_name or deployment.pull_steps:
                found.append((name, deployment))
        if found and not replace:
            listing = ", ".join(f"{n} (work pool {d.work_pool_name!r})" for n, d in found)
            return (
                f"python -m flows serve: {listing} exists on this Prefect server, made by "
                "`prefect deploy` for workers; serving would run that deployment's pull steps. "
                "Pass --replace to replace it (its scheduled runs go with it), or serve "
                "against another server"
            )
        for name, deployment in found:
            sys.stderr.write(f"flows serve: replacing {name} (made by `prefect deploy`)\n")
            client.delete_deployment(deployment.id)
    return None


def ensure_crash_detection(silent_s: int) -> None:
    """The automation Prefect documents for zombie runs ("detect zombie flows"), for this
    flow's runs only: after a heartbeat, expect another event of the same run within
    ``silent_s`` seconds, or mark the run Crashed. Replaced, so a new setting applies."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    from flows.stages import FLOW_NAME as STAGES_FLOW
    from flows.training import FLOW_NAME

    try:
        Automation.read(name=ZOMBIE_AUTOMATION).delete()
    except ValueError:  # not created yet
        pass
    Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"Marks a {FLOW_NAME} or {STAGES_FLOW} run Crashed after {silent_s} s "
        "without heartbeats.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # the run, and a distributed run's flow runs on the pools' workers
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": [FLOW_NAME, STAGES_FLOW]}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silent_s} s: the run's process died "
                "(killed, out of memory or its machine lost); the next run resumes the work",
            )
        ],
    ).create()


if __name__ == "__main__":
    sys.exit(main())
