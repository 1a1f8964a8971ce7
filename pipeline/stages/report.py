"""Stage ``report``: one self-contained HTML page about the run (``reports/index.html``).

A person opens it instead of ten JSON files: whether this run's model was promoted to
production (a banner at the top, from ``metrics/promote.json``), what data went in and
what was thrown out, what changed since the production model (the champion), how the
split and the training went, where the model fails, and whether the ONNX file is safe
to ship. Everything on it comes from files the earlier stages wrote, plus
provenance from git, ``dvc.lock`` and the stages' run log. Charts are inline SVG,
thumbnails inline JPEG data URIs, and the one small script sorts and filters tables, so
the file opens offline, from disk, mailed or archived. Every name that comes from the
data is HTML-escaped (Jinja2 autoescaping; ``charts`` escapes its own labels).
"""

from __future__ import annotations

import base64
import datetime
import io
import logging
import os
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markdown_it import MarkdownIt
from markupsafe import Markup

from pipeline.config import Params, Paths, ReportParams
from pipeline.data.images import load_rgb
from pipeline.data.issues import ISSUES
from pipeline.data.rawstore import RawStore
from pipeline.data.splits import SPLITS, in_split_order, read_splits, rows_of
from pipeline.errors import DataError
from pipeline.reporting import changes, charts, scoring
from pipeline.reporting.headline import data_work, headline, promotion, read_metrics
from pipeline.reporting.scoring import MODELS
from pipeline.system.fsutil import read_json_or_empty, write_text_atomic
from pipeline.system.provenance import dvc_lock_stages, git_revision

log = logging.getLogger(__name__)
TEMPLATE = "report.html.j2"
# Test metrics side by side, with whether higher is better.
RESULT_METRICS = (
    ("top1", "top-1 accuracy", True),
    ("top5", "top-5 accuracy", True),
    ("mean_per_class_acc", "mean per-class accuracy", True),
    ("macro_f1", "macro-F1", True),
    ("nll", "negative log-likelihood", False),
    ("ece", "expected calibration error", False),
    ("ece_calibrated", "ECE after temperature scaling", False),
    ("temperature", "temperature (fitted on val)", None),
)


def read_csv(path: Path, dtype: type | None = None) -> pd.DataFrame:
    """A table an earlier stage wrote, as strings and numbers (or all as ``dtype``); empty
    when it is missing."""
    try:
        return pd.read_csv(path, dtype=dtype, keep_default_na=False)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return pd.DataFrame()


# --- sections ---------------------------------------------------------------------------


def thumbnail(path: str, px: int, store: RawStore | None) -> str:
    """A JPEG data URI of the image ``path`` in ``store`` shrunk to ``px`` on its longest
    side; '' if unreadable."""
    if store is None:
        return ""
    try:
        img = load_rgb(store.locate([path])[0], draft=(px, px))
        img.thumbnail((px, px))
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, DataError) as exc:
        log.warning("no thumbnail for %s: %s", path, exc)
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def data_section(
    paths: Paths,
    cfg: ReportParams,
    metrics: dict[str, dict],
    split_rows: dict[str, pd.DataFrame],
    store: RawStore | None,
) -> dict:
    validated, downloaded = metrics["validate"], metrics["download"]
    counts = validated.get("class_counts", {})
    quarantine = read_csv(paths.quarantine)
    by_class = quarantine.groupby("label").size().to_dict() if len(quarantine) else {}
    bars = sorted(
        ((name, {"kept": n, "quarantined": by_class.get(name, 0)}) for name, n in counts.items()),
        key=lambda row: (-row[1]["kept"], row[0]),
    )
    train = split_rows.get("train", pd.DataFrame(columns=["path", "label"]))
    gallery = []
    if cfg.thumbnails_per_class:
        for label, rows in train.sort_values("path").groupby("label", sort=True):
            picks = rows["path"].head(cfg.thumbnails_per_class)
            gallery.append(
                {
                    "label": label,
                    "images": [
                        {"src": thumbnail(p, cfg.thumbnail_px, store), "name": Path(p).name}
                        for p in picks
                    ],
                }
            )
    expectations = validated.get("expectations", {})
    docs = paths.validation_docs / "index.html"
    return {
        "source": downloaded.get("source"),
        "sha256": downloaded.get("sha256"),
        "excluded_classes": downloaded.get("excluded_classes", []),
        "validated": validated,
        "class_bars": charts.stacked_bars(
            bars, {"kept": charts.PALETTE[0], "quarantined": charts.PALETTE[5]}
        )
        if bars
        else None,
        "quarantine": quarantine.head(cfg.max_listed_files).to_dict("records"),
        "quarantine_total": len(quarantine),
        "quarantine_reasons": (
            quarantine["reason"].str.split(":").str[0].value_counts().to_dict()
            if len(quarantine)
            else {}
        ),
        "gallery": gallery,
        "checks": expectations.get("checks", []),
        "suite": {k: v for k, v in expectations.items() if k != "checks"},
        "data_docs": os.path.relpath(docs, paths.report.parent) if docs.exists() else None,
    }


def issues_section(paths: Paths, cfg: ReportParams, found: dict, store: RawStore | None) -> dict:
    """data_issues' advice: the likeliest issues of each kind as thumbnails (a near-duplicate
    pair side by side; given label, suggested label, score), and the class pairs the data
    confuses; the counts are ``found``'s (``metrics/data_issues.json``)."""
    table = read_csv(paths.data_issues, dtype=str)
    shown = []
    source_of = dict(zip(table.get("path", ()), table.get("source_path", ()), strict=True))
    for issue, rows in table.groupby("issue", sort=False) if "issue" in table else ():
        if issue == "near_duplicate":  # a pair is two rows of the table, one here
            rows = rows[rows["path"] < rows["related"]]
        for r in rows.head(cfg.data_issues_shown).itertuples(index=False):
            shown.append(
                {
                    "src": thumbnail(r.path, cfg.thumbnail_px, store),
                    "issue": ISSUES.get(issue, issue),
                    "given": r.given,
                    "suggested": r.suggested,
                    "score": float(r.score),
                    "name": r.source_path,
                    "related": source_of.get(r.related, r.related),
                    "related_src": thumbnail(r.related, cfg.thumbnail_px, store)
                    if r.related
                    else "",
                }
            )
    return {
        "found": found,
        "shown": shown,
        "table": paths.data_issues.as_posix(),
        "pairs": found.get("confused_pairs", []),
    }


def split_section(split_rows: dict[str, pd.DataFrame], summary: dict, cfg: ReportParams) -> dict:
    """Counts per split and class, and a leakage check: no image's bytes in two splits."""
    frames = [rows.assign(split=name) for name, rows in split_rows.items()]
    table = pd.concat(frames) if frames else pd.DataFrame(columns=["path", "label", "split"])
    per_class = (
        table.groupby(["label", "split"])
        .size()
        .unstack(fill_value=0)
        .reindex(columns=list(SPLITS), fill_value=0)
        if len(table)
        else pd.DataFrame(columns=list(SPLITS))
    )
    leaks = []
    if "sha256" in table:
        spread = table.groupby("sha256")["split"].nunique()
        for sha in spread[spread > 1].index:
            rows = table[table["sha256"] == sha]
            leaks.append(
                {"sha256": sha, "files": [f"{r.split}: {r.path}" for r in rows.itertuples()]}
            )
    bars = [
        (label, {s: int(row[s]) for s in SPLITS})
        for label, row in per_class.sort_values("train", ascending=False).iterrows()
    ]
    return {
        "counts": {s: int(per_class[s].sum()) for s in SPLITS},
        "per_class": [
            {"label": label, **{s: int(row[s]) for s in SPLITS}}
            for label, row in per_class.iterrows()
        ],
        "bars": charts.stacked_bars(bars, charts.SPLIT_COLOURS) if bars else None,
        "leaks": leaks[: cfg.max_listed_files],
        "leak_total": len(leaks),
        "duplicate_groups": summary.get("duplicate_groups"),
        "near_duplicate_groups": summary.get("near_duplicate_groups"),
        "dropped_classes": summary.get("dropped_classes", []),
    }


CHAMPION_COLUMNS = ("sha256", "label", "split")


def read_champion_images(path: Path) -> pd.DataFrame | None:
    """The production model's images as promote kept them (``paths.champion_images``);
    None when there is no such file (promote has not run)."""
    try:
        table = pd.read_parquet(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); run the promote stage again") from exc
    missing = [c for c in CHAMPION_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: no column {missing}; expected {list(CHAMPION_COLUMNS)}")
    return table.astype({"sha256": str, "label": str})


def current_images(paths: Paths) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The split tables' rows (in ``SPLITS`` order), and the features stage's embeddings
    of them in the same order (None where features has not written them all)."""
    try:
        rows = in_split_order(read_splits(paths))
    except DataError:
        return pd.DataFrame(columns=["sha256", "label"]), None
    arrays = [paths.features / f"{split}.npy" for split in SPLITS]
    arrays = [np.load(file, mmap_mode="r") if file.exists() else None for file in arrays]
    if any(a is None for a in arrays):
        return rows, None
    return rows, np.concatenate(arrays)


def changes_section(paths: Paths) -> dict:
    """Since the champion: images added and removed per class, the class-mix shift and
    each class's embedding drift (``changes.since_champion``)."""
    champion = read_champion_images(paths.champion_images)
    if champion is None:
        return {"champion": False}
    rows, embeddings = current_images(paths)
    if not len(rows):
        return {"champion": True, "result": None}
    result = changes.since_champion(champion, rows, embeddings)
    return {
        "champion": True,
        "result": result,
        "classes": sorted(result.classes, key=lambda c: (-(c.added + c.removed), c.label)),
        "alpha": changes.ALPHA,
        "permutations": changes.PERMUTATIONS,
    }


def curves(table: pd.DataFrame, name: str, best_epoch: Any) -> list[Markup]:
    """Loss and accuracy per epoch, train (solid) and val (dashed)."""
    if table.empty:
        return []
    epochs = table["epoch"].astype(float)

    def column(col: str) -> list[float]:
        return pd.to_numeric(table[col], errors="coerce").astype(float).tolist()

    marker = float(best_epoch) if isinstance(best_epoch, (int, float)) else None
    return [
        charts.line_chart(
            [
                charts.Series(f"train {what}", epochs, column(f"train_{what}")),
                charts.Series(f"val {what}", epochs, column(f"val_{what}"), dashed=True),
            ],
            f"{name}: {label}",
            label,
            marker,
            "kept",
        )
        for what, label in (("loss", "loss"), ("acc", "accuracy"))
    ]


def training_section(paths: Paths, metrics: dict[str, dict]) -> dict:
    head, finetune = metrics["train_head"], metrics["finetune"]
    return {
        "head": head,
        "finetune": finetune,
        "head_charts": curves(read_csv(paths.head_curves), "head", head.get("best_epoch")),
        "finetune_charts": curves(
            read_csv(paths.finetune_curves), "fine-tuning", finetune.get("best_epoch")
        ),
    }


def results_section(
    paths: Paths,
    cfg: ReportParams,
    evaluation: dict,
    split_rows: dict[str, pd.DataFrame],
    store: RawStore | None,
) -> dict:
    metrics = []
    for key, label, higher_is_better in RESULT_METRICS:
        values = {m: evaluation.get(m, {}).get(key) for m in MODELS}
        if all(v is None for v in values.values()):
            continue
        delta = None
        if higher_is_better is not None and None not in values.values():
            change = values["finetuned"] - values["head"]
            delta = {"value": change, "better": (change > 0) == higher_is_better and change != 0}
        metrics.append({"label": label, **values, "delta": delta})

    tables = {m: read_csv(paths.per_class_table(m)) for m in MODELS}
    classes = tables["finetuned"]["class"].astype(str).tolist() if len(tables["finetuned"]) else []
    train_counts = (
        split_rows["train"]["label"].value_counts().to_dict() if "train" in split_rows else {}
    )
    per_class = []
    head_recall = (
        dict(zip(tables["head"]["class"].astype(str), tables["head"]["recall"], strict=True))
        if len(tables["head"])
        else {}
    )
    for row in tables["finetuned"].itertuples(index=False):
        name = str(row[0])
        per_class.append(
            {
                "class": name,
                "train": train_counts.get(name, 0),
                "support": int(row.support),
                "head_recall": head_recall.get(name),
                "precision": float(row.precision),
                "recall": float(row.recall),
                "f1": float(row.f1),
            }
        )

    predictions = read_csv(paths.predictions_table())
    heatmap = None
    if len(predictions) and classes:
        index = {c: i for i, c in enumerate(classes)}
        cm = scoring.confusion_matrix(
            predictions["predicted"].astype(str).map(index).to_numpy(),
            predictions["label"].astype(str).map(index).to_numpy(),
            len(classes),
        )
        heatmap = charts.heatmap(cm, classes)
    pairs = []
    confused = read_csv(paths.most_confused_table("finetuned"))
    for pair in confused.head(cfg.confused_pairs).itertuples(index=False):
        true, predicted = str(pair.true), str(pair.predicted)
        examples = []
        if len(predictions) and cfg.examples_per_pair:
            wrong = predictions[
                (predictions["label"].astype(str) == true)
                & (predictions["predicted"].astype(str) == predicted)
            ].head(cfg.examples_per_pair)
            examples = [
                {
                    "src": thumbnail(r.path, cfg.thumbnail_px, store),
                    "name": Path(r.path).name,
                    "confidence": float(r.confidence),
                }
                for r in wrong.itertuples(index=False)
            ]
        pairs.append(
            {"true": true, "predicted": predicted, "count": int(pair.count), "examples": examples}
        )
    return {
        "metrics": metrics,
        "models": MODELS,
        "n": evaluation.get("finetuned", {}).get("n"),
        "per_class": per_class,
        "heatmap": heatmap,
        "pairs": pairs,
    }


def export_section(paths: Paths, parity: dict) -> dict:
    try:
        card_text = paths.model_card.read_text(encoding="utf-8")
    except OSError:
        card_text = ""
    # html=False: any HTML in the card (a class name, say) is shown as text, not run.
    card = Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(card_text))
    return {
        "parity": parity,
        "card": card if card_text else None,
        "onnx": paths.onnx if paths.onnx.exists() else None,
        "onnx_int8": paths.onnx_int8 if paths.onnx_int8.exists() else None,
    }


def provenance_section(paths: Paths) -> dict:
    """The commit, and for each stage DVC's record of it and the run log's times."""
    stages = []
    for name, entry in dvc_lock_stages().items():
        if name == "report":
            continue  # this stage's own entry is the previous run's
        timing = read_json_or_empty(paths.run_log_file(name))
        outs = [{"path": o.get("path"), "md5": o.get("md5", "")} for o in entry.get("outs", [])]
        recorded = {}
        for file_params in entry.get("params", {}).values():
            recorded.update(_flatten(file_params))
        stages.append(
            {
                "name": name,
                "outs": outs,
                "params": recorded,
                "finished_at": timing.get("finished_at"),
                "seconds": timing.get("seconds"),
                "peak_rss_mb": timing.get("peak_rss_mb"),
                "peak_rss_children_mb": timing.get("peak_rss_children_mb"),
                "status": timing.get("status"),
                # where it ran: the host, and for a distributed run its pool and worker
                # and the bytes it fetched from and sent to the DVC remote
                "host": timing.get("host"),
                "pool": timing.get("pool"),
                "worker": timing.get("worker"),
                "pulled_bytes": timing.get("pulled_bytes"),
                "pushed_bytes": timing.get("pushed_bytes"),
            }
        )
    return {
        **git_revision(),
        "stages": stages,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": sum(s["seconds"] or 0 for s in stages),
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


# --- rendering --------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".4f") -> str:
    """A number for a table cell; '—' for a figure a stage did not record."""
    missing = value is None or isinstance(value, jinja2.Undefined)
    if missing or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.reporting", "."),
        autoescape=True,
        # A stage that has not run leaves its figures out; the page shows what there is.
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    return env


def render(context: dict) -> str:
    return environment().get_template(TEMPLATE).render(**context)


def build(params: Params) -> str:
    """The page's HTML, from what the stages wrote under ``params.paths`` and ``dvc.lock``."""
    paths, cfg = params.paths, params.report
    metrics = read_metrics(paths)
    split_rows = {}
    try:
        table = read_splits(paths)
    except DataError:
        table = None
    for split in SPLITS if table is not None else ():
        rows = rows_of(table, split)
        if len(rows):
            split_rows[split] = rows
    store = RawStore.open_if_there(paths.raw)
    return render(
        {
            "title": f"transfer-pipeline run: {params.model.backbone} on {params.data.source}",
            "headline": headline(metrics),
            "promotion": promotion(metrics["promote"]),
            "data_work": data_work(metrics),
            "data": data_section(paths, cfg, metrics, split_rows, store),
            "split": split_section(split_rows, metrics["split"], cfg),
            "issues": issues_section(paths, cfg, metrics["data_issues"], store),
            "changes": changes_section(paths),
            "training": training_section(paths, metrics),
            "results": results_section(paths, cfg, metrics["evaluate"], split_rows, store),
            "export": export_section(paths, metrics["onnx_check"]),
            "provenance": provenance_section(paths),
        }
    )


def run(params: Params) -> dict:
    html = build(params)
    write_text_atomic(params.paths.report, html)
    size_kb = params.paths.report.stat().st_size / 1e3
    log.info("wrote %s (%.0f kB); open it in a browser", params.paths.report, size_kb)
    return {"report": str(params.paths.report), "size_kb": size_kb}


def main(params: Params) -> dict:
    return run(params)
