"""A distributed run against the same run on one machine, on the default data
(builtin:digits-mini) and default params, all on this machine over loopback.

Starts a Prefect server, moto's S3 server (credentials enforced) and a process worker per
pool, each in its own clone (``tests/support/cluster.py``, the setup the tests use), then:

1. ``python -m flows run --distributed`` twice from the origin repository: the first run
   computes every stage, the second finds each up to date on its worker;
2. ``python -m flows run`` twice in a plain clone: the same pipeline on one machine.

For the distributed runs it prints each stage's status, DVC seconds, bytes pulled and
pushed (the run-state artifacts), and per pool flow run the overhead around the stages:
hand-over (from the previous pool's end to this flow run's start: worker poll, process
start) and in-run overhead (checkout, pulls, pushes, Prefect), from the server's times.

    python bench/distributed.py [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import check, distributed_setup, run_name  # noqa: E402
from tests.support.prefect import prefect_server, run  # noqa: E402
from tests.support.project import copy_project, git  # noqa: E402


def say(text: str) -> None:
    sys.stdout.write(text + "\n")


def seconds_between(a: str, b: str) -> float:
    parse = datetime.datetime.fromisoformat
    return (parse(b) - parse(a)).total_seconds()


def distributed_run(cluster) -> dict:
    started = time.perf_counter()
    output = check(cluster.orchestrate())
    wall = time.perf_counter() - started
    children = cluster.stage_runs(run_name(output))
    groups, previous_end = [], None
    for child in children:
        stage_seconds = sum(r["seconds"] for r in child["records"])
        span = seconds_between(child["start_time"], child["end_time"])
        groups.append(
            {
                "pool": child["work_pool_name"],
                "stages": [r["stage"] for r in child["records"]],
                "flow_run_seconds": round(span, 1),
                "stage_seconds": round(stage_seconds, 1),
                "in_run_overhead_s": round(span - stage_seconds, 1),
                "hand_over_s": round(seconds_between(previous_end, child["start_time"]), 1)
                if previous_end
                else None,
            }
        )
        previous_end = child["end_time"]
    records = [r for c in children for r in c["records"]]
    return {"wall_s": round(wall, 1), "groups": groups, "stages": records}


def one_machine_run(repo: Path, env: dict) -> float:
    started = time.perf_counter()
    check(run([sys.executable, "-m", "flows", "run"], repo, env, 3600))
    return round(time.perf_counter() - started, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as name:
        tmp = Path(name)
        with prefect_server(tmp) as server:
            origin = copy_project(tmp / "origin", extra=("flows", "prefect.yaml"))
            git(origin, "init", "-q")
            git(origin, "add", "-A")
            git(origin, "commit", "-qm", "project")
            results: dict = {}
            with distributed_setup(tmp, server, origin) as cluster:
                results["distributed_first"] = distributed_run(cluster)
                results["distributed_second"] = distributed_run(cluster)
            local = tmp / "one-machine"
            git(tmp, "clone", "-q", str(origin), str(local))
            results["one_machine_first_s"] = one_machine_run(local, server)
            results["one_machine_second_s"] = one_machine_run(local, server)
    say(json.dumps(results, indent=2))
    for run_key in ("distributed_first", "distributed_second"):
        figures = results[run_key]
        say(f"\n{run_key}: {figures['wall_s']} s")
        say("| stage | pool | status | DVC s | pulled B | pushed B |")
        for r in figures["stages"]:
            say(
                f"| {r['stage']} | {r['pool']} | {r['status']} | {r['seconds']} "
                f"| {r['pulled_bytes']} | {r['pushed_bytes']} |"
            )
        for g in figures["groups"]:
            say(
                f"{g['pool']} {g['stages'][0]}…{g['stages'][-1]}: flow run {g['flow_run_seconds']} s"
                f" = stages {g['stage_seconds']} s + overhead {g['in_run_overhead_s']} s;"
                f" hand-over {g['hand_over_s']} s"
            )
    say(
        f"\none machine: first {results['one_machine_first_s']} s, "
        f"second {results['one_machine_second_s']} s"
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
