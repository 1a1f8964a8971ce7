"""The few figures a run is judged by: the report's header, the Prefect flow's summary
artifact and ``python -m pipeline outputs`` (with where each output lives) show the same
rows; the report's banner and the summary open with the same promotion decision."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.config import Paths
from pipeline.reporting.scoring import MODELS
from pipeline.system.fsutil import read_json_or_empty

METRIC_STAGES = (
    "download",
    "validate",
    "split",
    "features",
    "data_issues",
    "train_head",
    "finetune",
    "evaluate",
    "onnx_check",
    "promote",
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
    if metrics["data_issues"]:
        rows.append(("data issues (advice)", data_issue_counts(metrics["data_issues"])))
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


@dataclass(frozen=True)
class Promotion:
    """promote's decision in words: ``title`` says it in one line ("promoted: version 3",
    "not promoted: <reason>"), ``details`` give the figures it rests on."""

    decision: str
    title: str
    details: list[str]
    promoted: bool  # production moved to this run's model (a first version too)


def promotion(promote: dict) -> Promotion | None:
    """The decision in ``metrics/promote.json`` (``first``, ``promoted`` or ``kept``);
    None before promote has run."""
    decision = promote.get("decision")
    if not decision:
        return None
    version, production = promote.get("version"), promote.get("production_version")
    reason = promote.get("reason") or ""
    if decision == "kept":
        title = f"not promoted: {reason}" if reason else "not promoted"
        details = [
            f"production stays at version {production}; this run's model is version {version}"
        ]
    elif decision == "first":
        title = f"promoted version {version}: the first version, now production"
        details = [reason] if reason else []
    else:
        champion = promote.get("champion_version")
        title = f"promoted version {version}" + (f" (was version {champion})" if champion else "")
        details = [reason] if reason else []
    details += _comparison(promote)
    return Promotion(decision, title, details, decision != "kept")


def _comparison(promote: dict) -> list[str]:
    """The figures of a challenger-champion comparison, where promote made one."""
    challenger, champion = promote.get("challenger") or {}, promote.get("champion") or {}
    if not (challenger and champion):
        return []

    def figures(model: dict) -> str:
        return (
            f"top-1 {_number(model.get('top1'))}, "
            f"mean per-class accuracy {_number(model.get('mean_class_accuracy'))}"
        )

    lines = [f"challenger {figures(challenger)}; champion {figures(champion)}"]
    on = f"on {promote['images']:,} test images" if promote.get("images") is not None else ""
    if promote.get("left_out"):
        on += f" ({promote['left_out']:,} left out: the champion trained or validated on them)"
    right = ""
    if promote.get("challenger_only_right") is not None:
        right = (
            f"right only by the challenger {promote['challenger_only_right']:,}, "
            f"only by the champion {promote.get('champion_only_right', 0):,}"
        )
    p_value = f"p = {promote['p_value']:.3g}" if promote.get("p_value") is not None else ""
    lines.append("; ".join(part for part in (on, right, p_value) if part))
    classes = promote.get("classes") or {}
    if classes.get("added") or classes.get("removed"):
        lines.append(
            f"compared on {_count(classes.get('compared'))} classes both models know; "
            f"added {_count(classes.get('added'))}, removed {_count(classes.get('removed'))}"
        )
    return [line for line in lines if line]


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "—"


def _count(value: Any) -> str:
    """A class count, whether promote wrote the names or their number."""
    if isinstance(value, list | tuple):
        return f"{len(value)} ({', '.join(map(str, value[:10]))}{', …' if len(value) > 10 else ''})"
    return "—" if value is None else str(value)


def data_work(metrics: dict[str, dict]) -> list[str]:
    """What the data stages did this run: files decoded by validate, images embedded by
    features, each against what earlier runs' kept work saved."""
    lines = []
    validated, embedded = metrics.get("validate", {}), metrics.get("features", {})
    if "decoded" in validated:
        lines.append(
            f"validate decoded {validated['decoded']:,} files "
            f"({validated.get('reused', 0):,} judged from facts kept by earlier runs)"
        )
    if "computed" in embedded:
        lines.append(
            f"features embedded {embedded['computed']:,} images "
            f"({embedded.get('reused', 0):,} embeddings reused)"
        )
    return lines


def data_issue_counts(found: dict) -> str:
    """data_issues' headline: what it found, in words ("12 likely label errors, …")."""
    counts = (
        (found.get("label_errors", 0), "likely label error", "likely label errors"),
        (found.get("near_duplicate_pairs", 0), "near-duplicate pair", "near-duplicate pairs"),
        (found.get("outliers", 0), "outlier", "outliers"),
    )
    return ", ".join(f"{n:,} {one if n == 1 else many}" for n, one, many in counts) + (
        f" among {found['images']:,} train and val images" if "images" in found else ""
    )


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
