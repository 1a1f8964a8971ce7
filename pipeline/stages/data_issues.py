"""Stage ``data_issues``: advice on what may be wrong in the user's own data.

From the features stage's embeddings of every train and val image (no image is scored by
a probe that saw its label; ``pipeline/data/issues.py``): likely label errors, outliers,
near-duplicates with different labels, and the class pairs the data confuses. Written to
``metrics/data_issues.csv`` (one row per image and issue, with the path a labels table
names it by, so the rows a person agrees with become a relabelling table) and
``metrics/data_issues.json`` (the counts and the confused pairs), shown in the report and
the Prefect summary. Nothing is dropped or relabelled: it is advice (docs/data-issues.md).

What it finds is kept in the memo under the images' sha256s and labels, the embeddings'
backbone and engine, these settings and the code that finds it, so a rerun over the same
data computes nothing.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from pipeline.config import DataIssuesParams, Params, Paths
from pipeline.data import issues
from pipeline.data.featurestore import labelled, load_features
from pipeline.data.splits import in_split_order, read_splits
from pipeline.errors import DataError
from pipeline.system import memo
from pipeline.system.fsutil import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

SCORED = ("train", "val")
COLUMNS = [
    "path",
    "sha256",
    "issue",
    "score",
    "given",
    "suggested",
    "split",
    "source_path",
    "related",
]


def find(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, cfg: DataIssuesParams
) -> dict:
    """Everything found in the embeddings ``x`` (one row per image) with labels ``y`` and
    copies marked by ``groups``, by row number: plain lists, as kept in the memo."""
    unit = issues.unit_rows(x)
    oof = issues.out_of_fold_probabilities(
        issues.principal_axes(unit), y, groups, n_classes, cfg.folds, cfg.seed
    )
    found = issues.label_issues(oof, y)
    near = issues.neighbourhood(unit, y, cfg.neighbours, cfg.near_duplicate_similarity)
    far, distance = issues.outliers(near.similarity, cfg.outlier_fence)
    predicted = oof.probs.argmax(axis=1)
    judged = oof.judged
    return {
        "label_error": [
            [int(r), float(s), int(c)]
            for r, s, c in zip(found.rows, found.score, found.suggested, strict=True)
        ],
        "outlier": [
            [int(r), float(d), int(predicted[r])] for r, d in zip(far, distance, strict=True)
        ],
        "near_duplicate": [[i, j, s] for i, j, s in near.near_duplicates],
        "confused_pairs": [
            list(pair)
            for pair in issues.confused_classes(oof.probs[judged], y[judged], cfg.confused_pairs)
        ],
        "not_judged": sorted({int(c) for c in y[~judged]}),
        "out_of_fold_top1": round(float((predicted[judged] == y[judged]).mean()), 4)
        if judged.any()
        else None,
    }


def memo_key(index: dict, rows: pd.DataFrame, cfg: DataIssuesParams) -> str:
    """Everything what is found depends on: the images and labels in order, what embedded
    them, the settings and the code that finds it (``issues.py`` and this module)."""
    embedding = {k: index.get(k) for k in ("backbone", "weights", "preprocessing", "engine")}
    code = "".join(inspect.getsource(m) for m in (issues, sys.modules[__name__]))
    return memo.digest(
        {
            "code": code,
            "settings": asdict(cfg),
            "classes": index["classes"],
            "embedding": embedding,
            "images": "\n".join(rows["sha256"] + "\t" + rows["label"]),
        }
    )


def source_paths(paths: Paths, rows: pd.DataFrame) -> pd.Series:
    """Each image's path as ``data.labels`` names it: its row's path in the labels table
    when there was one, else its place in the class folders (``<class>/<file>``)."""
    raw_root = PurePosixPath(paths.raw.as_posix())

    def relative(path: str) -> str:
        try:
            return PurePosixPath(path).relative_to(raw_root).as_posix()
        except ValueError:
            return path

    raw = rows["path"].map(relative)
    if paths.label_rows.exists():
        table = pd.read_csv(paths.label_rows, dtype=str, keep_default_na=False)
        table = table[table["raw"] != ""]
        if len(table):
            return raw.map(dict(zip(table["raw"], table["path"], strict=True))).fillna(raw)
    return raw


def issue_rows(paths: Paths, rows: pd.DataFrame, classes: list[str], found: dict) -> pd.DataFrame:
    """The table a person reads and edits: one row per image and issue, most likely first
    within each issue."""
    source = source_paths(paths, rows).to_numpy()
    path, sha, given, split = (rows[c].to_numpy() for c in ("path", "sha256", "label", "split"))

    def row(r: int, issue: str, score: float, suggested: str, related: str = "") -> dict:
        return {
            "path": path[r], "sha256": sha[r], "issue": issue, "score": score,
            "given": given[r], "suggested": suggested, "split": split[r],
            "source_path": source[r], "related": related,
        }  # fmt: skip

    out = [row(r, "label_error", s, classes[c]) for r, s, c in found["label_error"]]
    for i, j, s in found["near_duplicate"]:
        out.append(row(i, "near_duplicate", s, given[j], path[j]))
        out.append(row(j, "near_duplicate", s, given[i], path[i]))
    out += [
        row(r, "outlier", d, classes[c] if classes[c] != given[r] else "")
        for r, d, c in found["outlier"]
    ]
    return pd.DataFrame(out, columns=COLUMNS)


def summary(found: dict, classes: list[str], images: int) -> dict:
    """``metrics/data_issues.json``: the counts the report and the flow's summary show."""
    flagged = {row[0] for row in found["label_error"]} | {row[0] for row in found["outlier"]}
    flagged |= {i for pair in found["near_duplicate"] for i in pair[:2]}
    return {
        "images": images,
        "label_errors": len(found["label_error"]),
        "outliers": len(found["outlier"]),
        "near_duplicate_pairs": len(found["near_duplicate"]),
        "images_flagged": len(flagged),
        "out_of_fold_top1": found["out_of_fold_top1"],
        # classes with too few train and val images for a probe to judge their labels
        "not_judged": [classes[c] for c in found["not_judged"]],
        "confused_pairs": [
            {"classes": [classes[a], classes[b]], "images": n, "share": share}
            for a, b, n, share in found["confused_pairs"]
        ],
    }


def scored_rows(paths: Paths) -> pd.DataFrame:
    """The train and val images (path, label, sha256, split), in the features' row order."""
    return in_split_order(read_splits(paths), SCORED)


def embeddings(
    paths: Paths, arrays: dict[str, np.ndarray], classes: list[str], rows: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """The scored images' embeddings and class numbers; a row that is not a finite
    embedding fails naming its image (it would make every probability NaN)."""
    parts = [labelled(paths, arrays, classes, split) for split in SCORED]
    x = np.concatenate([np.asarray(part.x) for part in parts])
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        names = ", ".join(rows["path"].iloc[bad[:5]])
        raise DataError(
            f"{paths.features}: {len(bad)} embeddings are not finite ({names}): "
            "run the features stage again (dvc repro -f features)"
        )
    return x, np.concatenate([part.y for part in parts])


def run(paths: Paths, cfg: DataIssuesParams) -> dict:
    started = time.perf_counter()
    arrays, index = load_features(paths)
    classes, rows = index["classes"], scored_rows(paths)
    store, key = memo.Store(paths.memo, memo.DATA_ISSUES), memo_key(index, rows, cfg)
    found = store.get(key, lambda p: json.loads(p.read_text(encoding="utf-8")))
    reused = found is not None
    if found is None:
        x, y = embeddings(paths, arrays, classes, rows)
        groups = pd.factorize(rows["sha256"])[0]
        found = find(x, y, groups, len(classes), cfg)
        store.put(key, lambda tmp: Path(tmp).write_text(json.dumps(found), encoding="utf-8"))

    table = issue_rows(paths, rows, classes, found)
    with atomic_path(paths.data_issues) as tmp:
        table.to_csv(tmp, index=False)
    metrics = summary(found, classes, len(rows)) | {
        "reused": reused,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(paths.metrics_file("data_issues"), metrics)
    log.info(
        "data_issues: %d likely label errors, %d outliers, %d near-duplicate pairs among %d "
        "images (advice: %s)%s",
        metrics["label_errors"],
        metrics["outliers"],
        metrics["near_duplicate_pairs"],
        len(rows),
        paths.data_issues,
        "; kept from an earlier run" if reused else "",
    )
    return metrics


def main(params: Params) -> dict:
    return run(params.paths, params.data_issues)
