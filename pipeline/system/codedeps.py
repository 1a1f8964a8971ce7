"""dvc.yaml's code deps, generated: each stage lists exactly the project files
``python -m pipeline <stage>`` runs, and export lists exactly the params its file hashes.

DVC reruns a stage when a file it lists changes, so a stage that runs a file it does not
list is called up to date after that code changed. DVC's templating cannot splice a list
into ``deps``, so ``python -m pipeline deps --write`` rewrites those lines of dvc.yaml in
place (comments and every other line kept) and ``deps --check`` says what differs.

The import closure is read from the source (every ``import``, at any depth, so lazy
imports count too); nothing is imported to compute it.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from functools import cache
from pathlib import Path

PACKAGE = "pipeline"
DVC_YAML = "dvc.yaml"
FIX = "python -m pipeline deps --write"

_STAGE = re.compile(r"^  ([A-Za-z_][\w-]*):\s*$")
_BLOCK = re.compile(r"^    (deps|params):\s*$")
_ITEM = re.compile(r"^      - (\S.*?)\s*$")


def module_file(name: str, root: Path) -> Path | None:
    """The file of project module ``name`` (a module or a package's ``__init__``)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def direct_imports(file: Path, root: Path) -> frozenset[Path]:
    """Project files ``file`` imports, and the packages (``__init__.py``) on their way."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise ValueError(f"{file}: a relative import; this project imports absolutely")
            base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages above it run their __init__ too
            path = module_file(".".join(parts[:i]), root)
            if path is not None:
                found.add(path)
    found.discard(file)
    return frozenset(found)


def closure(*files: Path, root: Path) -> set[Path]:
    """``files`` and every project file they import, directly or not."""
    seen: set[Path] = set()
    todo = list(files)
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(direct_imports(file, root))
    return seen


def stage_closure(stage: str, root: Path) -> list[str]:
    """The project files ``python -m pipeline <stage>`` runs, relative to ``root``, sorted.

    The command's dispatcher (``pipeline/__main__.py``) counts as a file of its own: its
    other branches (predict, verify, deps, outputs) are not on a stage's path. From there
    the stage runner and the stage module are followed.
    """
    package = root / PACKAGE
    files = closure(package / "runner.py", package / "stages" / f"{stage}.py", root=root)
    files |= {package / "__main__.py", package / "__init__.py"}
    return sorted(f.relative_to(root).as_posix() for f in files)


def expected(root: Path, stages: list[str]) -> dict[tuple[str, str], list[str]]:
    """What the generated lines of each stage should be: ``(stage, "deps")`` → its code
    files, ``("export", "params")`` → the keys the ONNX file's params_sha256 hashes."""
    from pipeline.system.provenance import model_param_keys

    wanted = {(stage, "deps"): stage_closure(stage, root) for stage in stages}
    if "export" in stages:
        wanted[("export", "params")] = model_param_keys()
    return wanted


def is_generated(block: str, item: str) -> bool:
    """Whether a list item is one the generator owns: code files in ``deps``; every key of
    the one ``params`` block it writes."""
    return block == "params" or item.endswith(".py")


def stage_modules(text: str, root: Path) -> list[str]:
    """The dvc.yaml stages that are pipeline stage modules (``pipeline/stages/<name>.py``)."""
    names = [m.group(1) for line in text.splitlines() if (m := _STAGE.match(line))]
    return [name for name in names if (root / PACKAGE / "stages" / f"{name}.py").is_file()]


def rewrite(text: str, wanted: dict[tuple[str, str], list[str]]) -> tuple[str, list[str]]:
    """``text`` with each wanted block's generated items replaced (first, in the order
    given), the block's comments and other items kept in place after them.

    Returns the new text and one line per difference: what a stage lists that it should
    not, and what it misses.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    problems: list[str] = []
    stage = block = None
    held: list[str] = []  # the current block's lines

    def flush() -> None:
        if block is None:
            return
        key = (stage, block)
        if key not in wanted:
            out.extend(held)
            return
        listed = [m.group(1) for line in held if (m := _ITEM.match(line))]
        mine = [item for item in listed if is_generated(block, item)]
        leading = []
        for line in held:  # comments above the first item stay on top
            if _ITEM.match(line):
                break
            leading.append(line)
        rest = [
            line
            for line in held[len(leading) :]
            if not ((m := _ITEM.match(line)) and is_generated(block, m.group(1)))
        ]
        out.extend(leading)
        out.extend(f"      - {item}\n" for item in wanted[key])
        out.extend(rest)
        verb = ("import", "imports") if block == "deps" else ("hash", "hashes")
        found = [
            f"{DVC_YAML}: stage {stage} {block} lists {item}, which it does not {verb[0]}"
            for item in sorted(set(mine) - set(wanted[key]))
        ] + [
            f"{DVC_YAML}: stage {stage} {block} misses {item}, which it {verb[1]}"
            for item in sorted(set(wanted[key]) - set(mine))
        ]
        if not found and mine != wanted[key]:
            found.append(f"{DVC_YAML}: stage {stage} {block} lists its items in another order")
        problems.extend(found)

    for line in lines:
        stage_match = _STAGE.match(line)
        block_match = _BLOCK.match(line)
        inside = block is not None and (
            _ITEM.match(line) or line.startswith("      ") or not line.strip()
        )
        if block is not None and not inside:
            flush()
            block, held = None, []
        if stage_match:
            stage = stage_match.group(1)
        if block_match and stage is not None:
            block, held = block_match.group(1), []
            out.append(line)
            continue
        if block is not None:
            held.append(line)
        else:
            out.append(line)
    flush()
    return "".join(out), problems


def main(argv: list[str]) -> int:
    """``python -m pipeline deps [--check | --write]``, run from the project root."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline deps",
        description="Check (default) or rewrite dvc.yaml's code deps and export's params.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="exit 1 when dvc.yaml differs")
    action.add_argument("--write", action="store_true", help="rewrite dvc.yaml in place")
    args = parser.parse_args(argv)

    root = Path.cwd()
    path = root / DVC_YAML
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        sys.stderr.write(f"{path}: not found (run from the project root)\n")
        return 2
    new, problems = rewrite(text, expected(root, stage_modules(text, root)))
    if new != text and not problems:
        problems.append(f"{DVC_YAML}: the generated lines are laid out differently")
    if args.write:
        if new != text:
            from pipeline.system.fsutil import write_text_atomic

            write_text_atomic(path, new)
        sys.stdout.writelines(f"fixed: {problem}\n" for problem in problems)
        sys.stdout.write(f"{DVC_YAML}: {'rewritten' if new != text else 'already up to date'}\n")
        return 0
    sys.stderr.writelines(f"{problem}\n" for problem in problems)
    if problems:
        sys.stderr.write(f"run `{FIX}` to fix\n")
        return 1
    return 0
