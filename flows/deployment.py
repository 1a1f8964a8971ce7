"""What a deployment takes from params.yaml, for ``prefect deploy`` (prefect.yaml's build step).

The schedule (``flows.cron``, ``flows.timezone``) and the heartbeat (``flows.heartbeat_s``)
are written once, in params.yaml; ``python -m flows serve`` reads them directly, and
prefect.yaml's deployments template them from this step's output.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params


def settings(params_file: str = "params.yaml") -> dict[str, str]:
    """A prefect.yaml step: ``{{ settings.cron }}``, ``timezone`` and ``heartbeat_s``."""
    cfg = load_params(Path(params_file)).flows
    return {"cron": cfg.cron, "timezone": cfg.timezone, "heartbeat_s": str(cfg.heartbeat_s)}
