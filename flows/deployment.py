"""prefect.yaml's steps: what a deployment takes from params.yaml (build), and where a
worker's flow run works (pull).

The schedule (``flows.cron``, ``flows.timezone``), the source sensor's period
(``flows.sensor_interval_s``) and the heartbeat (``flows.heartbeat_s``)
are written once, in params.yaml; ``python -m flows serve`` reads them directly, and
prefect.yaml's deployments template them from this step's output.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import load_params


def settings(params_file: str = "params.yaml") -> dict[str, str]:
    """A prefect.yaml step: ``{{ settings.cron }}``, ``timezone``, ``heartbeat_s`` and
    ``sensor_rrule`` (flows.sensor_interval_s as an RFC 5545 rule)."""
    cfg = load_params(Path(params_file)).flows
    return {
        "cron": cfg.cron,
        "timezone": cfg.timezone,
        "heartbeat_s": str(cfg.heartbeat_s),
        # prefect deploy checks an `interval` before it fills in templates, an `rrule` after
        "sensor_rrule": f"FREQ=SECONDLY;INTERVAL={cfg.sensor_interval_s}",
    }


def worker_workspace() -> dict[str, str]:
    """A prefect.yaml pull step: work in ``$TRANSFER_PIPELINE_DIR``, this worker's clone.

    Read when the flow run starts on the worker, not when ``prefect deploy`` runs (a
    ``{{ $VAR }}`` in prefect.yaml is filled in at deploy time, with the deploying
    machine's value), so every worker can keep its clone where it likes.
    """
    directory = os.environ.get("TRANSFER_PIPELINE_DIR")
    if not directory:
        raise RuntimeError(
            "TRANSFER_PIPELINE_DIR is not set on this worker: start it with "
            "TRANSFER_PIPELINE_DIR=/path/to/its/clone prefect worker start --pool <pool>"
        )
    os.chdir(directory)
    return {"directory": os.getcwd()}
