"""Running one stage: ``python -m pipeline <stage>`` (dispatched here by ``__main__``) and
``run_stage``, the same as a plain function call.

The stage runs with the settings in params.yaml, read once; its start, end, duration and
peak memory go to the run log (``paths.run_log``), and its errors become one line naming
what to fix, with exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import logging
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline import stages

log = logging.getLogger("pipeline")
COMMANDS = "Run one stage of the pipeline with the settings in params.yaml."


def run_stage(stage: str, params_file: str | None = None, *, own_process: bool = False) -> dict:
    """Run ``stage`` as a plain function call, reading ``params_file`` once.

    ``own_process``: the process exists for this stage (``python -m pipeline``), so its
    age when the work begins is the stage's start-up, recorded in the run log."""
    from pipeline.config import PARAMS_FILE, load_params
    from pipeline.errors import PipelineError
    from pipeline.system.process import seconds_since_start

    if stage not in stages.names():
        raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(stages.names())}")
    params = load_params(params_file or PARAMS_FILE)
    module = importlib.import_module(f"pipeline.stages.{stage}")
    startup = seconds_since_start() if own_process else None
    with logged_run(params.paths.run_log_file(stage), startup_seconds=startup):
        return module.main(params)


@contextlib.contextmanager
def logged_run(log_file: Path, startup_seconds: float | None = None) -> Iterator[None]:
    """Record the stage's start, end, seconds, peak memory and outcome in ``log_file`` (the
    run report's dates and durations). A log beside DVC's outputs, not one of them: a rerun
    that changes nothing else must not make the stages downstream of it rerun.

    ``startup_seconds``: how long the process had existed when the stage began its work
    (its interpreter and imports; under ``python -m pipeline``, not a plain call).
    Peak RSS is the stage's own process and, separately, the largest of its finished child
    processes (loader workers); both come from getrusage, so they cost nothing to record."""
    from pipeline.system.fsutil import write_json_atomic

    started, clock = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    status = "failed"
    try:
        yield
        status = "succeeded"
    finally:
        write_json_atomic(
            log_file,
            {
                "started_at": started.isoformat(timespec="seconds"),
                "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "seconds": round(time.perf_counter() - clock, 2),
                "startup_seconds": startup_seconds,
                "host": socket.gethostname(),
                **peak_rss_mb(),
                "status": status,
            },
        )


def peak_rss_mb() -> dict[str, float]:
    """This process's peak resident set, and its largest finished child's, in MB (10^6 B)."""
    import resource

    scale = 1024 / 1e6 if sys.platform != "darwin" else 1 / 1e6  # KiB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"peak_rss_mb": round(own, 1), "peak_rss_children_mb": round(children, 1)}


def main(argv: list[str]) -> int:
    """``python -m pipeline <stage> [--params FILE] [-v]``."""
    from pipeline.errors import PipelineError
    from pipeline.system.process import exit_with_parent

    exit_with_parent()  # a stage dies with the dvc (or shell) that started it
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description=COMMANDS,
        epilog="Also: `python -m pipeline predict --help` (label images with the ONNX model), "
        "`verify --help` (re-hash DVC's outputs and cache), `outputs` (where results are).",
    )
    parser.add_argument("stage", choices=stages.names(), help="the stage to run")
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    # Our stages log at INFO; libraries only their warnings (the ONNX exporter's INFO
    # lines run to thousands).
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    started = time.perf_counter()
    try:
        run_stage(args.stage, args.params, own_process=True)
    except PipelineError as exc:
        log.error("%s failed: %s", args.stage, exc)
        return 1
    except OSError as exc:  # a full disk in a stage without its own handling is still the user's
        from pipeline.system.diskfull import DiskFullError, is_disk_full

        if not is_disk_full(exc):
            raise
        log.error("%s failed: %s", args.stage, DiskFullError(Path(exc.filename or Path.cwd())))
        return 1
    except KeyboardInterrupt:
        log.error("%s interrupted; nothing was committed", args.stage)
        return 130
    log.info("%s finished in %.1f s", args.stage, time.perf_counter() - started)
    return 0
