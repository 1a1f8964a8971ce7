"""``python -m pipeline registry list | set-production N | rollback``: look at the model
registry and move its ``production`` alias by hand (docs/registry.md).

The registry and model name default to ``promote.registry`` and ``promote.name`` of
params.yaml when run in the project; ``--registry URL --name NAME`` name another. Moves
hold the registry's lock, as promote does, and point production only at a version whose
files are read back and match their checksums.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.errors import PipelineError
from pipeline.registry.store import Registry


def registry_from(
    url: str | None, name: str | None, params_file: str
) -> tuple[Registry, float, float]:
    """The registry named on the command line, else params.yaml's; the lock's timeout and lease."""
    if url and name:
        return Registry(url, name), 60.0, 300.0
    from pipeline.config import load_params

    cfg = load_params(params_file).promote
    return Registry(url or cfg.registry, name or cfg.name), cfg.lock_timeout_s, cfg.lock_lease_s


def list_versions(registry: Registry) -> list[str]:
    production = registry.alias()
    lines = []
    for version in registry.versions():
        record = registry.version(version)
        if record is None:
            lines.append(f"{version:>4}  (incomplete: no version.json)")
            continue
        mark = "*" if production and production.version == version else " "
        figures = (record.get("metrics") or {}).get("promote") or {}
        top1 = (figures.get("challenger") or {}).get("top1")
        lines.append(
            f"{version:>4}{mark} {record.get('created_at', '')}  {record.get('decision', ''):<8} "
            f"top-1 {'-' if top1 is None else f'{top1:.4f}'}  "
            f"sha256 {record['files']['model.onnx']['sha256'][:12]}  {record.get('reason', '')}"
        )
    if production is not None:
        lines.append(f"production: version {production.version} ({production.reason})")
    else:
        lines.append("production: none")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline registry",
        description="List the registry's versions, or move its production alias.",
    )
    parser.add_argument("--registry", default=None, help="URL (default: promote.registry)")
    parser.add_argument("--name", default=None, help="registered model (default: promote.name)")
    parser.add_argument("--params", default="params.yaml", help="default: %(default)s")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every version, its decision and figures; * production")
    move = commands.add_parser("set-production", help="point production at version N")
    move.add_argument("version", type=int)
    commands.add_parser("rollback", help="point production back at the previous production")
    args = parser.parse_args(argv)
    try:
        registry, timeout_s, lease_s = registry_from(args.registry, args.name, args.params)
        registry.check()
        if args.command == "list":
            sys.stdout.write("\n".join(list_versions(registry)) + "\n")
            return 0
        with registry.locked(timeout_s, lease_s):
            if args.command == "rollback":
                alias = registry.rollback()
            else:
                alias = registry.set_alias(args.version, "set by hand")
    except PipelineError as exc:
        sys.stderr.write(f"registry: {exc}\n")
        return 1
    sys.stdout.write(f"production: version {alias.version} (sha256 {alias.sha256})\n")
    return 0
