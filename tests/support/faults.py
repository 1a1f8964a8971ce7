"""Shared by the fault-injection suite (RELIABILITY.md): trial counts and a results log.

Every fault test is marked ``faults``. The plain ``make test`` (CI) runs the cheap ones at
full counts and the rest with small trial counts; ``make faults`` sets
``PIPELINE_FAULTS=full`` for the counts RELIABILITY.md reports and
``PIPELINE_FAULTS_RESULTS`` to a JSON-lines file that each test appends its tally to, so
the table in RELIABILITY.md is printed by the run itself
(``python -m tests.support.faults_summary``).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

FULL = os.environ.get("PIPELINE_FAULTS") == "full"
# The random cases of the network and disk suites; set it to replay a run.
SEED = int(os.environ.get("PIPELINE_FAULTS_SEED", "20250107"))


def trials(full: int, fast: int | None = None) -> int:
    """How many trials to run: ``full`` under ``make faults``; in ``make test`` (CI) ``fast``,
    or ``full`` too where no ``fast`` is given. A fault that is cheap at full counts runs
    them everywhere, so a change that moves a full-count case (a new cut point, a new
    offset) is caught in CI, not first in a ``make faults`` run."""
    return full if FULL or fast is None else fast


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


def run_trials(fault: str, cases: list, trial: Callable[[object], str | None]) -> list[str]:
    """Run ``trial(case)`` for each case; a trial passes when it raises nothing.

    ``trial`` returns "data lost" when it kept a partial or wrong output (counted apart).
    Records the tally, then returns the failures for the caller to assert on.
    """
    failures, lost = [], 0
    for i, case in enumerate(cases):
        try:
            if trial(case) == "data lost":
                lost += 1
                failures.append(f"trial {i} ({case}): kept a partial or wrong output")
        except (Exception, pytest.fail.Exception) as exc:  # counted, then reported
            failures.append(f"trial {i} ({case}): {type(exc).__name__}: {exc}")
    print(f"{fault}: seed {SEED}, cases {cases}")  # noqa: T201 (shown with -s, to replay)
    record(fault, len(cases), len(cases) - len(failures), lost, seed=SEED, cases=repr(cases))
    return failures
