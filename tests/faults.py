"""Shared by the fault-injection suite (RELIABILITY.md): trial counts and a results log.

Every fault test is marked ``faults``. The plain ``make test`` (CI) runs them with small
trial counts; ``make faults`` sets ``PIPELINE_FAULTS=full`` for the counts RELIABILITY.md
reports and ``PIPELINE_FAULTS_RESULTS`` to a JSON-lines file that each test appends its
tally to, so the table in RELIABILITY.md is printed by the run itself
(``python -m tests.faults_summary``).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

FULL = os.environ.get("PIPELINE_FAULTS") == "full"


def trials(full: int, fast: int) -> int:
    """How many trials to run: ``full`` under ``make faults``, ``fast`` in CI."""
    return full if FULL else fast


def record(fault: str, trials: int, passed: int, data_lost: int = 0, **details) -> None:
    """Append one fault's tally to ``$PIPELINE_FAULTS_RESULTS`` (if set).

    Call it before asserting, so a failing run still reports how many trials passed.
    ``data_lost`` counts trials that left a partial or wrong output that was kept.
    """
    target = os.environ.get("PIPELINE_FAULTS_RESULTS")
    if not target:
        return
    row = {
        "fault": fault,
        "trials": trials,
        "passed": passed,
        "data_lost": data_lost,
        "mode": "full" if FULL else "fast",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **details,
    }
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row, sort_keys=True) + "\n")
