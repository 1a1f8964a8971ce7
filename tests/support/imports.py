"""Which project files a module runs: its import closure inside the project, read from
the source (every ``import``, at any depth, so lazy imports count too); and whether modules
import in a fresh interpreter where some packages are missing."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

from tests.support.project import REPO_ROOT

PACKAGE = "pipeline"


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
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
def direct_imports(file: Path, root: Path = REPO_ROOT) -> frozenset[Path]:
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


def closure(*files: Path, root: Path = REPO_ROOT) -> set[Path]:
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


def stage_closure(stage: str, root: Path = REPO_ROOT) -> set[str]:
    """The project files ``python -m pipeline <stage>`` runs, relative to ``root``.

    The command's dispatcher (``pipeline/__main__.py``) counts as a file of its own: its
    other branches (predict, verify, outputs) are not on a stage's path. From there the
    stage runner and the stage module are followed.
    """
    entry = root / PACKAGE / "__main__.py"
    files = closure(
        root / PACKAGE / "runner.py", root / PACKAGE / "stages" / f"{stage}.py", root=root
    )
    files |= {entry, root / PACKAGE / "__init__.py"}
    return {f.relative_to(root).as_posix() for f in files}


def import_without(blocked: tuple[str, ...], modules: list[str]) -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter in which importing any of ``blocked`` raises
    ImportError (module-level imports only: a lazy import is not run)."""
    code = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    code += "".join(f"import {module}\n" for module in modules)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
