"""Print the fault suite's results (JSON lines from tests/support/faults.py) as a Markdown table,
with the run's wall time and the CPU it ran on (RELIABILITY.md quotes both).

python -m tests.support.faults_summary logs/faults/results.jsonl [--wall-s SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU as ``lscpu`` names it ("model name" in /proc/cpuinfo), and its core count."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        name = next(
            line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faults_summary")
    parser.add_argument("results", nargs="?", default="logs/faults/results.jsonl")
    parser.add_argument("--wall-s", type=float, help="the run's wall time, to print beside it")
    args = parser.parse_args(argv)
    path = Path(args.results)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    lines = ["| fault | trials | passed | data lost |", "|---|---:|---:|---:|"]
    lines += [
        f"| {row['fault']} | {row['trials']} | {row['passed']} | {row['data_lost']} |"
        for row in rows
    ]
    failed = [r for r in rows if r["passed"] != r["trials"] or r["data_lost"]]
    total = sum(r["trials"] for r in rows)
    summary = f"{len(rows)} faults, {total} trials, {len(failed)} with a failed trial or lost data"
    if args.wall_s is not None:
        summary += f", in {args.wall_s:,.0f} s on {cpu_name()}"
    lines += ["", summary]
    sys.stdout.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
