"""``python -m pipeline <stage>``: run one stage with the settings in params.yaml.

This is the command dvc.yaml runs for each stage; the stage modules do the work.
``python -m pipeline predict --model models/model.onnx IMAGE_OR_DIR...`` labels images
with the exported model; it is dispatched before anything else is imported, so it runs
where only onnxruntime, numpy and Pillow are installed. ``python -m pipeline verify``
re-hashes DVC's outputs and cache against dvc.lock (``pipeline/verify.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("pipeline")

# Stage name → module; the order of stages lives in dvc.yaml, not here.
STAGES = (
    "download",
    "validate",
    "split",
    "features",
    "train_head",
    "finetune",
    "evaluate",
    "export",
    "onnx_check",
    "report",
)


def run_stage(stage: str, params_file: str | None = None) -> dict:
    """Run ``stage`` as a plain function call, reading ``params_file`` once."""
    from pipeline.config import PARAMS_FILE, load_params
    from pipeline.errors import PipelineError

    if stage not in STAGES:
        raise PipelineError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    params = load_params(params_file or PARAMS_FILE)
    module = importlib.import_module(f"pipeline.{stage}")
    with logged_run(params.paths.run_log_file(stage)):
        return module.main(params)


@contextlib.contextmanager
def logged_run(log_file: Path) -> Iterator[None]:
    """Record the stage's start, end, seconds, peak memory and outcome in ``log_file`` (the
    run report's dates and durations). A log beside DVC's outputs, not one of them: a rerun
    that changes nothing else must not make the stages downstream of it rerun.

    Peak RSS is the stage's own process and, separately, the largest of its finished child
    processes (loader workers); both come from getrusage, so they cost nothing to record."""
    from pipeline.fsutil import write_json_atomic

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


def describe_outputs(params_file: str | None = None) -> str:
    """Where each output of the pipeline lives, from params.yaml's ``paths`` section."""
    from pipeline.config import PARAMS_FILE, load_params

    paths = load_params(params_file or PARAMS_FILE).paths
    rows = [(f.name, getattr(paths, f.name)) for f in dataclasses.fields(paths)]
    lines = [f"  {name:<16} {path}{'/' if path.is_dir() else ''}" for name, path in rows]
    return "\n".join(lines + headline_figures(paths))


def headline_figures(paths) -> list[str]:
    """The few numbers a run is judged by, where the stages that make them have run."""
    from pipeline.fsutil import read_json_or_empty

    evaluation = read_json_or_empty(paths.metrics_file("evaluate"))
    parity = read_json_or_empty(paths.metrics_file("onnx_check"))
    lines = []
    for name in ("head", "finetuned"):
        if name in evaluation:
            m = evaluation[name]
            lines.append(
                f"  {name:<16} test top-1 {m['top1']:.4f}, mean per-class {m['mean_per_class_acc']:.4f}"
            )
    if parity:
        lines.append(
            f"  {'onnx':<16} top-1 {parity['onnx_top1']:.4f}, max |logit diff| "
            f"{parity['max_abs_diff']:.1e}, {parity['cpu_latency_ms_p50']:.1f} ms at batch 1, "
            f"{parity['cpu_throughput_ips']:.0f} img/s at batch {parity['batch_sizes'][-1]} "
            f"({parity['threads']} threads)"
        )
        if "int8" in parity:
            q = parity["int8"]
            lines.append(
                f"  {'onnx int8':<16} top-1 {q['top1']:.4f} (drop against fp32 "
                f"{100 * q['top1_drop']:.2f} pt), {q['cpu_latency_ms_p50']:.1f} ms at batch 1, "
                f"{q['cpu_throughput_ips']:.0f} img/s"
            )
        if "cpu" in parity:
            cpu = parity["cpu"]
            lines.append(
                f"  {'measured on':<16} {cpu['model']}; int8 kernels: {cpu['onnxruntime_int8_kernel']}"
            )
    if lines:
        lines = ["", "Results (all figures: dvc metrics show):", *lines]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        from pipeline.predict import main as predict

        return predict(argv[1:])
    if argv[:1] == ["verify"]:
        from pipeline.verify import main as verify

        return verify(argv[1:])
    from pipeline.errors import PipelineError
    from pipeline.process import exit_with_parent

    exit_with_parent()  # a stage dies with the dvc (or shell) that started it
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument(
        "stage",
        choices=(*STAGES, "outputs", "predict", "verify"),
        help="a stage; 'outputs' lists where results are; 'predict --help' for the predictor; "
        "'verify --help' to re-hash DVC's outputs and cache",
    )
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
        if args.stage == "outputs":
            sys.stdout.write(describe_outputs(args.params) + "\n")
            return 0
        run_stage(args.stage, args.params)
    except PipelineError as exc:
        log.error("%s failed: %s", args.stage, exc)
        return 1
    except OSError as exc:  # a full disk in a stage without its own handling is still the user's
        from pipeline.diskfull import DiskFullError, is_disk_full

        if not is_disk_full(exc):
            raise
        log.error("%s failed: %s", args.stage, DiskFullError(Path(exc.filename or Path.cwd())))
        return 1
    except KeyboardInterrupt:
        log.error("%s interrupted; nothing was committed", args.stage)
        return 130
    log.info("%s finished in %.1f s", args.stage, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
