"""The few figures a run is judged by: the report's header, the Prefect flow's summary
artifact and ``python -m pipeline outputs`` (with where each output lives) show the same
rows."""

from __future__ import annotations

import dataclasses

from pipeline.config import Paths
from pipeline.reporting.scoring import MODELS
from pipeline.system.fsutil import read_json_or_empty

METRIC_STAGES = (
    "download",
    "validate",
    "split",
    "train_head",
    "finetune",
    "evaluate",
    "onnx_check",
)


def read_metrics(paths: Paths) -> dict[str, dict]:
    """Every stage's ``metrics/<stage>.json``, read once; ``{}`` for a stage not run yet."""
    return {stage: read_json_or_empty(paths.metrics_file(stage)) for stage in METRIC_STAGES}


def headline(metrics: dict[str, dict]) -> list[tuple[str, str]]:
    """(figure, value) rows: the report's header, and the Prefect flow's artifact."""
    validated, evaluation, parity = (metrics[s] for s in ("validate", "evaluate", "onnx_check"))
    rows: list[tuple[str, str]] = []
    if validated:
        rows.append(("images used", f"{validated['images']:,} in {validated['classes']} classes"))
        # undecodable files, plus the rows and files a labels table set aside
        rows.append(("quarantined", f"{validated['quarantined']:,}"))
    for name, label in MODELS.items():
        if name in evaluation:
            rows.append((f"test top-1, {label}", f"{evaluation[name]['top1']:.4f}"))
    if "finetuned" in evaluation:
        rows.append(
            (
                "fine-tuned mean per-class accuracy",
                f"{evaluation['finetuned']['mean_per_class_acc']:.4f}",
            )
        )
    if parity:
        rows.append(("ONNX parity check", "passed" if parity.get("passed") else "FAILED"))
        rows.append(("ONNX max abs logit difference", f"{parity['max_abs_diff']:.1e}"))
        rows.append(("ONNX top-1 agreement", f"{parity['top1_agreement']:.4f}"))
        rows.append(("ONNX test top-1", f"{parity['onnx_top1']:.4f}"))
        int8 = parity.get("int8", {})
        if int8:
            rows.append(
                (
                    "int8 test top-1",
                    f"{int8['top1']:.4f} (drop {100 * int8['top1_drop']:.2f} pt)"
                    if "top1_drop" in int8
                    else f"{int8['top1']:.4f}",
                )
            )
        threads = parity["threads"]
        rows.append(
            (
                f"CPU latency, batch 1, {threads} threads",
                f"{parity['cpu_latency_ms_p50']:.1f} ms"
                + (f" (int8 {int8['cpu_latency_ms_p50']:.1f} ms)" if int8 else ""),
            )
        )
        if "cpu" in parity:
            cpu = parity["cpu"]
            rows.append(
                ("measured on", f"{cpu['model']}; int8 kernels {cpu['onnxruntime_int8_kernel']}")
            )
    return rows


def headline_markdown(paths: Paths) -> str:
    """The headline rows as a markdown table."""
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in headline(read_metrics(paths))]
    return "\n".join(lines)


def describe_outputs(params_file: str | None = None) -> str:
    """Where each output of the pipeline lives, from params.yaml's ``paths`` section."""
    from pipeline.config import PARAMS_FILE, load_params

    paths = load_params(params_file or PARAMS_FILE).paths
    rows = [(f.name, getattr(paths, f.name)) for f in dataclasses.fields(paths)]
    lines = [f"  {name:<16} {path}{'/' if path.is_dir() else ''}" for name, path in rows]
    return "\n".join(lines + headline_figures(paths))


def headline_figures(paths: Paths) -> list[str]:
    """The few numbers a run is judged by (the report's headline rows), where the stages
    that make them have run."""
    rows = headline(read_metrics(paths))
    if not rows:
        return []
    width = max(len(name) for name, _ in rows)
    return ["", "Results (all figures: dvc metrics show):"] + [
        f"  {name:<{width}}  {value}" for name, value in rows
    ]


def main(argv: list[str]) -> int:
    """``python -m pipeline outputs [--params FILE]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m pipeline outputs", description="Where each output is, and the results."
    )
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    sys.stdout.write(describe_outputs(args.params) + "\n")
    return 0
