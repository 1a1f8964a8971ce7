"""The settings reference (docs/settings.md), generated from the one declaration of params:
each key's default from params.yaml, what it accepts from its type in pipeline/config.py,
the stages whose dvc.yaml params name it, and what it does from params.yaml's comment.

``python -m pipeline settings`` prints it; ``--write`` rewrites docs/settings.md and
``--check`` (run by the tests) exits 1 when the file differs, so it cannot drift.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params, accepts, declared_type

DOC = Path("docs/settings.md")
FIX = "python -m pipeline settings --write"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<rest>.*)$")


def leaves(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of a params mapping, by dotted key, in file order."""
    found = []
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        found.extend(leaves(value, dotted) if isinstance(value, dict) else [(dotted, value)])
    return found


def comments(text: str) -> dict[str, str]:
    """Each key's comment in params.yaml: the one on its line, else the lines just above.

    A flow mapping's entries (``ratios: {train: 0.7, ...}``) share the mapping's comment.
    """
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    last = None  # the key whose inline comment a deeper-indented comment line continues
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            words = stripped.lstrip("#").strip()
            if last is not None and len(line) - len(line.lstrip()) > 8:
                found[last] = f"{found[last]} {words}"
            else:
                above.append(words)
                last = None
            continue
        match = _KEY.match(line)
        if not match:
            above, last = [], None
            continue
        indent = len(match["indent"])
        stack = [(i, k) for i, k in stack if i < indent]
        dotted = ".".join([k for _, k in stack] + [match["key"]])
        stack.append((indent, match["key"]))
        rest = match["rest"]
        inline = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        found[dotted] = inline or " ".join(above)
        last = dotted if inline else None
        above = []
    return found


def readers(dvc_yaml: dict) -> dict[str, list[str]]:
    """The stages whose dvc.yaml params name each key (or a mapping above it)."""
    found: dict[str, list[str]] = {}
    for name, stage in dvc_yaml.get("stages", {}).items():
        for key in stage.get("params", []):
            if isinstance(key, str):
                found.setdefault(key, []).append(name)
    return found


def templated(dvc_text: str) -> set[str]:
    """The ``paths.*`` keys dvc.yaml templates into deps and outs."""
    return set(re.findall(r"\$\{(paths\.\w+)\}", dvc_text))


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference(params_text: str, dvc_text: str) -> str:
    """The markdown page: one table per section of params.yaml."""
    params = yaml.safe_load(params_text)
    notes = comments(params_text)
    read_by = readers(yaml.safe_load(dvc_text))
    in_dvc = templated(dvc_text)
    lines = [
        "# Settings reference",
        "",
        "Every key of `params.yaml`, generated from the one declaration of params",
        "(`pipeline/config.py`: each key's type says what it accepts) by",
        "`python -m pipeline settings --write`; a test runs `--check`, so this page cannot",
        "drift. A value outside what a key accepts fails at load time, before any work, in",
        "one line naming the key.",
        "",
        inspect.getdoc(Params) or "",
        "",
        "*Stages* are those whose `params` in dvc.yaml name the key: changing it reruns them",
        "(and what follows). A key no stage names changes no output: it says how hard to try,",
        "or belongs to the Prefect flows.",
    ]
    section = None
    for dotted, default in leaves(params):
        head = dotted.split(".", 1)[0]
        if head != section:
            section = head
            lines += [
                "",
                f"## `{section}`",
                "",
                "| key | default | accepts | stages | what it does |",
            ]
            lines.append("| --- | --- | --- | --- | --- |")
        parts = dotted.split(".")
        owners = sorted(
            {s for i in range(1, len(parts) + 1) for s in read_by.get(".".join(parts[:i]), [])}
        )
        if dotted in in_dvc:
            stages = "dvc.yaml's deps and outs"
        else:
            stages = ", ".join(owners) or "—"
        shown = yaml.safe_dump(default, default_flow_style=True, allow_unicode=True)
        shown = shown.strip().removesuffix("...").strip()
        note = notes.get(dotted, "")
        if not note and len(parts) > 2:  # an entry of a flow mapping: the mapping's comment
            note = notes.get(".".join(parts[:-1]), "")
        lines.append(
            f"| `{dotted}` | `{cell(shown)}` | {cell(accepts(declared_type(dotted)))} "
            f"| {stages} | {cell(note)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m pipeline settings [--check | --write]``, from the project root."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline settings",
        description="Print the settings reference, or check or rewrite docs/settings.md.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="exit 1 when the page differs")
    action.add_argument("--write", action="store_true", help="rewrite docs/settings.md")
    args = parser.parse_args(argv)
    try:
        page = reference(
            Path("params.yaml").read_text(encoding="utf-8"),
            Path("dvc.yaml").read_text(encoding="utf-8"),
        )
    except FileNotFoundError as exc:
        sys.stderr.write(f"{exc.filename}: not found (run from the project root)\n")
        return 2
    if args.write:
        from pipeline.system.fsutil import write_text_atomic

        DOC.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(DOC, page)
        sys.stdout.write(f"{DOC}: written\n")
        return 0
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != page:
            sys.stderr.write(f"{DOC}: differs from params.yaml and config.py: run `{FIX}`\n")
            return 1
        return 0
    sys.stdout.write(page)
    return 0
