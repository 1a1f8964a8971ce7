"""Whether modules import in a fresh interpreter where some packages are missing. (Which
project files a module runs, its import closure, is the product's own:
``pipeline/system/codedeps.py``, which writes dvc.yaml's code deps.)"""

from __future__ import annotations

import subprocess
import sys

from tests.support.project import REPO_ROOT


def import_without(blocked: tuple[str, ...], modules: list[str]) -> subprocess.CompletedProcess:
    """Import ``modules`` in a fresh interpreter in which importing any of ``blocked`` raises
    ImportError (module-level imports only: a lazy import is not run)."""
    code = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    code += "".join(f"import {module}\n" for module in modules)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
