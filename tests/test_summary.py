"""The Prefect summary artifact's text (flows/summary.py): the promotion decision first,
then the data stages' new work, from the metrics files a run leaves."""

from __future__ import annotations

import json
from pathlib import Path

from flows.dvcrun import StageResult
from flows.summary import summary_markdown
from tests.support.project import params_from
from tests.support.promotion import KEPT, PROMOTED

RESULTS = [StageResult("validate", "ran", 1.5), StageResult("promote", "ran", 3.0)]


def write_metrics(root: Path, promote: dict | None) -> None:
    metrics = root / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "validate.json").write_text(
        json.dumps({"images": 39, "classes": 3, "quarantined": 0, "decoded": 10, "reused": 29})
    )
    (metrics / "features.json").write_text(json.dumps({"images": 39, "computed": 10, "reused": 29}))
    if promote is not None:
        (metrics / "promote.json").write_text(json.dumps(promote))


def summary(root: Path) -> str:
    return summary_markdown(RESULTS, params_from({}).paths.under(root), None, [])


def test_the_summary_opens_with_not_promoted_and_why(tmp_path):
    write_metrics(tmp_path, KEPT)
    text = summary(tmp_path)
    assert text.startswith(
        "# training-pipeline run\n\n"
        "## not promoted: the challenger is worse: top-1 0.4000 vs 0.9000 <b>(p = 1.2e-05)</b>\n\n"
        "- production stays at version 2; this run's model is version 3\n"
        "- challenger top-1 0.4000, mean per-class accuracy 0.3800; "
        "champion top-1 0.9000, mean per-class accuracy 0.8800\n"
    )
    assert (
        "Data work this run: validate decoded 10 files (29 judged from facts kept by earlier "
        "runs); features embedded 10 images (29 embeddings reused).\n" in text
    )
    assert "| validate | cpu | ran | 1.5 |" in text and "| images used | 39 in 3 classes |" in text


def test_the_summary_names_the_promoted_version(tmp_path):
    write_metrics(tmp_path, PROMOTED)
    text = summary(tmp_path)
    assert "\n## promoted version 2 (was version 1)\n" in text and "not promoted" not in text


def test_before_promote_runs_the_summary_has_no_decision(tmp_path):
    write_metrics(tmp_path, None)
    text = summary(tmp_path)
    assert "##" not in text and "promoted" not in text
    assert "validate decoded 10 files" in text


def test_the_summary_counts_the_data_issues(tmp_path):
    write_metrics(tmp_path, PROMOTED)
    found = {"images": 6935, "label_errors": 41, "outliers": 1, "near_duplicate_pairs": 23}
    (tmp_path / "metrics" / "data_issues.json").write_text(json.dumps(found))
    text = summary(tmp_path)
    assert (
        "| data issues (advice) | 41 likely label errors, 23 near-duplicate pairs, 1 outlier "
        "among 6,935 train and val images |" in text
    )
