"""The pipeline's stages: one module per stage of dvc.yaml, named as the stage.

Each module has ``main(params)``, which ``python -m pipeline <stage>`` calls. No module
here imports another stage: what stages share lives in the support packages beside this
one (sources, data, modeling, reporting, serving, system), so a stage's dvc.yaml deps are
its own import closure.
"""

from __future__ import annotations

import pkgutil


def names() -> tuple[str, ...]:
    """The stages, one per module of this package (sorted; dvc.yaml holds their order, and a
    test holds the two lists equal)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg))
