"""How well data_issues finds label errors (issue #39): Caltech-101 with a share of its
labels flipped at random into other classes (seeded), through ``python -m pipeline``
download → data_issues with the labels as a table; then the same on the clean labels.

Reports precision and recall of the flipped train and val images among the top k reported
label errors, for k = how many were flipped (test images are not scored), over everything
reported, and how often the suggested label is the true one; the stage's seconds; on the
clean labels, how many it reports and the top 20 (a contact sheet, ``--root``/top20.jpg,
to judge by eye). With cleanlab importable, its ``find_label_issues`` on the same
out-of-fold probabilities, for comparison (not a dependency of the pipeline).

    python bench/data_issues.py --root /tmp/issues-bench [--flip 0.02] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.data import issues  # noqa: E402
from pipeline.data.featurestore import load_features  # noqa: E402
from pipeline.stages import data_issues  # noqa: E402
from pipeline.system.cpu import cpu_info  # noqa: E402
from tests.support.project import copy_project, set_params  # noqa: E402

CALTECH = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "101_ObjectCategories.tar.gz"
)
STAGES = ("download", "validate", "split", "features", "data_issues")


def caltech_folder(root: Path) -> Path:
    """Caltech-101's class folders under ``root`` (extracted once)."""
    folder = root / "101_ObjectCategories"
    if not folder.exists():
        if not CALTECH.exists():
            sys.exit(f"skipped: {CALTECH} is absent (see ../shared/datasets/README.md)")
        with tarfile.open(CALTECH) as archive:
            archive.extractall(root, filter="data")
    return folder


def labels_table(folder: Path, share: float, seed: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """Every image's row (path, label), with ``share`` of them moved at random into
    another class: (table, {flipped path: true label})."""
    rows = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.glob("*/*.jpg")
        if not p.parent.name.startswith("BACKGROUND")
    )
    table = pd.DataFrame({"path": rows, "label": [r.split("/")[0] for r in rows]})
    classes = sorted(table["label"].unique())
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(table), int(round(share * len(table))), replace=False)
    truth = {}
    for i in sorted(picked):
        true = table.at[i, "label"]
        others = [c for c in classes if c != true]
        table.at[i, "label"] = others[rng.integers(len(others))]
        truth[table.at[i, "path"]] = true
    return table, truth


def run_project(repo: Path, folder: Path, table: pd.DataFrame, memo: Path) -> float:
    """The stages through data_issues in a fresh project; data_issues' seconds."""
    copy_project(repo)
    table.to_csv(repo / "labels.csv", index=False)
    set_params(
        repo,
        data={"source": str(folder), "labels": "labels.csv"},
        paths={"memo": str(memo)},
    )
    for stage in STAGES:
        subprocess.run([sys.executable, "-m", "pipeline", stage], cwd=repo, check=True)
    log = json.loads((repo / "logs" / "stages" / "data_issues.json").read_text())
    return round(log["startup_seconds"] + log["seconds"], 2)  # the process's start, its work


def scored_rows(repo: Path) -> pd.DataFrame:
    """The stage's own train and val rows of ``repo``, in the features' order, each with
    the path the labels table names it by (``source``)."""
    with contextlib.chdir(repo):
        paths = load_params().paths
        rows = data_issues.scored_rows(paths)
        return rows.assign(source=data_issues.source_paths(paths, rows).to_numpy())


def cleanlab_comparison(repo: Path, rows: pd.DataFrame, truth: dict[str, str]) -> dict | None:
    """cleanlab's find_label_issues on the stage's own out-of-fold probabilities."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None
    with contextlib.chdir(repo):
        params = load_params()
        arrays, index = load_features(params.paths)
        x, y = data_issues.embeddings(params.paths, arrays, index["classes"], rows)
    cfg = params.data_issues
    groups = pd.factorize(rows["sha256"])[0]
    probs = issues.out_of_fold_probabilities(
        issues.principal_axes(issues.unit_rows(x)),
        y,
        groups,
        len(index["classes"]),
        cfg.folds,
        cfg.seed,
    ).probs
    sources = rows["source"].to_numpy()
    out = {}
    for method in ("low_self_confidence", "prune_by_noise_rate"):
        found = find_label_issues(
            y, probs, filter_by=method, return_indices_ranked_by="self_confidence"
        )
        out[method] = precision_recall([sources[i] for i in found], truth)
    return out


def precision_recall(reported: list[str], truth: dict[str, str]) -> dict:
    k = len(truth)
    top = set(reported[:k])
    hits_all = len(set(reported) & set(truth))
    return {
        "reported": len(reported),
        "precision_at_k": round(len(top & set(truth)) / max(min(k, len(reported)), 1), 4),
        "recall_at_k": round(len(top & set(truth)) / k, 4),
        "precision_all": round(hits_all / max(len(reported), 1), 4),
        "recall_all": round(hits_all / k, 4),
    }


def contact_sheet(folder: Path, rows: pd.DataFrame, out: Path, px: int = 160) -> None:
    """The rows' images in a grid, each captioned in the file name (given → suggested in
    the printed list)."""
    sheet = Image.new("RGB", (5 * px, ((len(rows) + 4) // 5) * px), "white")
    for n, path in enumerate(rows["source_path"]):
        image = Image.open(folder / path).convert("RGB")
        image.thumbnail((px - 4, px - 4))
        sheet.paste(image, ((n % 5) * px + 2, (n // 5) * px + 2))
    sheet.save(out, quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a folder to work in")
    parser.add_argument("--flip", type=float, default=0.02, help="share of labels flipped")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    folder = caltech_folder(args.root)
    memo = args.root / "memo"  # shared: the images are embedded once
    results: dict = {"cpu": cpu_info().model, "cores": os.cpu_count(), "flip": args.flip}

    clean, _ = labels_table(folder, 0.0, args.seed)
    noisy, truth = labels_table(folder, args.flip, args.seed)
    for name, table in (("clean", clean), ("flipped", noisy)):
        repo = args.root / name
        started = time.perf_counter()
        seconds = run_project(repo, folder, table, memo)
        found = pd.read_csv(repo / "metrics" / "data_issues.csv", keep_default_na=False)
        errors = found[found["issue"] == "label_error"]
        summary = json.loads((repo / "metrics" / "data_issues.json").read_text())
        result = {
            "data_issues_s": seconds,
            "wall_s": round(time.perf_counter() - started, 1),
            "images": summary["images"],
            "label_errors": summary["label_errors"],
            "outliers": summary["outliers"],
            "near_duplicate_pairs": summary["near_duplicate_pairs"],
            "out_of_fold_top1": summary["out_of_fold_top1"],
            "confused_pairs": summary["confused_pairs"][:5],
        }
        if name == "flipped":
            rows = scored_rows(repo)
            sources = set(rows["source"])
            scored = {p: t for p, t in truth.items() if p in sources}  # flips in train or val
            result["flipped_scored"] = len(scored)
            result.update(precision_recall(list(errors["source_path"]), scored))
            suggested = dict(zip(errors["source_path"], errors["suggested"], strict=True))
            found_flips = [p for p in scored if p in suggested]
            result["suggested_is_true"] = round(
                sum(suggested[p] == scored[p] for p in found_flips) / max(len(found_flips), 1), 4
            )
            result["cleanlab"] = cleanlab_comparison(repo, rows, scored)
        else:
            top = errors.head(20)
            contact_sheet(folder, top, args.root / "top20.jpg")
            result["top20"] = [
                f"{r.source_path}: {r.given} -> {r.suggested} ({r.score})"
                for r in top.itertuples(index=False)
            ]
        results[name] = result
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
