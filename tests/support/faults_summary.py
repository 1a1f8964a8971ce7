"""Print the fault suite's results (JSON lines from tests/support/faults.py) as a Markdown table.

python -m tests.support.faults_summary logs/faults/results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "logs/faults/results.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    lines = ["| fault | trials | passed | data lost |", "|---|---:|---:|---:|"]
    lines += [
        f"| {row['fault']} | {row['trials']} | {row['passed']} | {row['data_lost']} |"
        for row in rows
    ]
    failed = [r for r in rows if r["passed"] != r["trials"] or r["data_lost"]]
    total = sum(r["trials"] for r in rows)
    lines += [
        "",
        f"{len(rows)} faults, {total} trials, {len(failed)} with a failed trial or lost data",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
