"""A run's summary, as Prefect artifacts: first whether the model was promoted ("promoted
version N" / "not promoted: <reason>", from ``metrics/promote.json``) and what the data
stages decoded and embedded, then each stage's status, time and place, the run report's
headline table and the model's path (markdown, ``training-pipeline-summary``), and the
HTML report as a link (``training-pipeline-report``)."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.dvcrun import StageResult
from pipeline.config import Paths
from pipeline.reporting.headline import data_work, headline_markdown, promotion, read_metrics


def human_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def summary_markdown(
    results: list[StageResult], paths: Paths, experiment: str | None, repairs: list[str]
) -> str:
    """The run's artifact: the promotion decision and the data stages' new work, then each
    stage's status, time and place, and the report's headline table.

    ``paths``: the workspace's, made absolute with ``Paths.under``.
    """
    lines = ["# training-pipeline run", ""]
    metrics = read_metrics(paths)
    decision = promotion(metrics["promote"])
    if decision:
        lines += [f"## {decision.title}", ""]
        lines += [f"- {line}" for line in decision.details] + ([""] if decision.details else [])
    work = data_work(metrics)
    if work:
        lines += [f"Data work this run: {'; '.join(work)}.", ""]
    if repairs:
        lines += ["Damaged copies found and repaired before the run (`python -m pipeline verify`):"]
        lines += [f"- {line}" for line in repairs] + [""]
    if experiment:
        lines += [f"Saved as DVC experiment `{experiment}` (`dvc exp show`).", ""]
    if any(r.pool for r in results):
        lines += [
            "| stage | placement | pool | worker | host | status | seconds | pulled | pushed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.stage} | {r.placement} | {r.pool} | {r.worker} | {r.host} | {r.status} "
            f"| {r.seconds:.1f} | {human_bytes(r.pulled_bytes)} | {human_bytes(r.pushed_bytes)} |"
            for r in results
        ]
    else:
        lines += ["| stage | placement | status | seconds |", "|---|---|---|---|"]
        lines += [f"| {r.stage} | {r.placement} | {r.status} | {r.seconds:.1f} |" for r in results]
    lines += ["", headline_markdown(paths), ""]
    lines.append(f"ONNX model: `{paths.onnx}`")
    if paths.report.exists():
        lines.append(f"Run report: `{paths.report}`")
    return "\n".join(lines) + "\n"


def publish(
    results: list[StageResult],
    workspace: Path,
    paths: Paths,
    experiment: str | None,
    repairs: list[str],
) -> None:
    """The summary as a markdown artifact; the HTML report, where it exists, as a link.

    ``paths``: as in params.yaml, relative to ``workspace``.
    """
    absolute = paths.under(workspace)
    create_markdown_artifact(
        summary_markdown(results, absolute, experiment, repairs),
        key="training-pipeline-summary",
        description="Stages, headline figures and the model of this run",
    )
    if absolute.report.exists():
        create_link_artifact(
            absolute.report.as_uri(),
            link_text=str(paths.report),
            key="training-pipeline-report",
            description="This run's HTML report (a file on the machine that ran the flow)",
        )
