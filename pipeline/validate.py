"""Stage ``validate``: a manifest of every raw file, a quarantine, and a Great Expectations suite.

Each file is decoded once, the way every later stage will load it (``images.load_rgb``).
Files that cannot be used are quarantined with their reason (listed, never deleted);
the rest must pass the suite, whose Data Docs land in ``reports/validation/``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.config import Params, Paths, ValidateParams
from pipeline.errors import DataError
from pipeline.expectations import Check, format_failures, run_suite
from pipeline.fsutil import atomic_path, is_os_litter, sha256_file, write_json_atomic
from pipeline.images import KNOWN_MODES, probe_image

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "label",
    "bytes",
    "sha256",
    "format",
    "mode",
    "width",
    "height",
    "exif_orientation",
    "decodable",
    "reason",
    "phash",
]


def list_raw_files(raw: Path) -> list[tuple[str, str]]:
    """(path, label) for every file under ``raw/<label>/``, sorted, paths as given to open."""
    if not raw.is_dir():
        raise DataError(f"{raw} does not exist: run the download stage first")
    rows = []
    for class_dir in sorted(p for p in raw.iterdir() if p.is_dir()):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if not is_os_litter(path.relative_to(raw).as_posix()):
                    rows.append((path.as_posix(), class_dir.name))
    return rows


def _describe_file(item: tuple[str, str], max_pixels: int) -> dict:
    path, label = item
    info = probe_image(path, max_pixels)
    return {
        "path": path,
        "label": label,
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(Path(path)),
        **asdict(info),
    }


def build_manifest(
    files: list[tuple[str, str]], max_pixels: int, workers: int | None = None
) -> pd.DataFrame:
    """Probe every file (in parallel processes) into one row each."""
    workers = workers or min(len(files) // 256 + 1, os.cpu_count() or 1)
    describe = partial(_describe_file, max_pixels=max_pixels)
    progress = dict(total=len(files), unit="img", desc="validate", disable=None)
    if workers <= 1:
        rows = [describe(item) for item in tqdm(files, **progress)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(tqdm(pool.map(describe, files, chunksize=64), **progress))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    return manifest.astype({"exif_orientation": "Int64", "width": "Int64", "height": "Int64"})


def suite_checks(cfg: ValidateParams) -> dict[str, list[Check]]:
    """The expectations, per table: the usable images, per-class counts, sha256 → classes."""
    return {
        "images": [
            *(
                Check(
                    "ExpectColumnValuesToNotBeNull", {"column": c}, describe=f"{c} is never empty"
                )
                for c in ("path", "label", "sha256", "format", "mode", "width", "height")
            ),
            Check("ExpectColumnValuesToBeUnique", {"column": "path"}, describe="each path once"),
            Check(
                "ExpectColumnValuesToBeBetween",
                {"column": "width", "min_value": cfg.min_side, "max_value": cfg.max_side},
                describe=f"width within validate.min_side..max_side ({cfg.min_side}..{cfg.max_side})",
            ),
            Check(
                "ExpectColumnValuesToBeBetween",
                {"column": "height", "min_value": cfg.min_side, "max_value": cfg.max_side},
                describe=f"height within validate.min_side..max_side ({cfg.min_side}..{cfg.max_side})",
            ),
            Check(
                "ExpectColumnValuesToBeInSet",
                {"column": "mode", "value_set": sorted(KNOWN_MODES)},
                describe="colour mode is one load_rgb converts",
            ),
        ],
        "classes": [
            Check(
                "ExpectColumnValuesToBeBetween",
                {"column": "images", "min_value": cfg.min_images_per_class},
                describe=f"every class has at least validate.min_images_per_class="
                f"{cfg.min_images_per_class} usable images",
            ),
        ],
        "sha256_labels": [
            Check(
                "ExpectColumnValuesToBeBetween",
                {"column": "labels", "max_value": 1},
                hard=False,
                describe="an identical image (same sha256) never appears under two classes",
            ),
        ],
    }


def suite_tables(usable: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables the suite runs on, derived from the usable rows of the manifest."""
    classes = usable.groupby("label").size().rename("images").to_frame()  # rows named by class
    sha_labels = usable.groupby("sha256")["label"].nunique().rename("labels").to_frame()
    return {"images": usable, "classes": classes, "sha256_labels": sha_labels}


def cross_class_duplicates(usable: pd.DataFrame, limit: int = 20) -> list[dict]:
    """Identical images filed under more than one class: the label noise worth a look."""
    by_sha = usable.groupby("sha256").agg(
        labels=("label", lambda s: sorted(set(s))), paths=("path", sorted)
    )
    shared = by_sha[by_sha["labels"].map(len) > 1].head(limit)
    return [
        {"sha256": sha, "labels": row.labels, "paths": row.paths} for sha, row in shared.iterrows()
    ]


def summarise(manifest: pd.DataFrame, usable: pd.DataFrame, suite) -> dict:
    """The contract metrics of validate.json."""
    cross = cross_class_duplicates(usable, limit=len(usable))
    return {
        "files": len(manifest),
        "images": len(usable),
        "classes": int(usable["label"].nunique()),
        "quarantined": int((~manifest["decodable"]).sum()),
        "duplicates": int(len(usable) - usable["sha256"].nunique()),
        "duplicates_across_classes": len(cross),
        "duplicate_examples": cross[:20],
        "exif_rotated": int((usable["exif_orientation"].fillna(1) > 1).sum()),
        "modes": {str(k): int(v) for k, v in usable["mode"].value_counts().sort_index().items()},
        "class_counts": {str(k): int(v) for k, v in usable.groupby("label").size().items()},
        "expectations": suite.summary(),
    }


def run(paths: Paths, cfg: ValidateParams) -> dict:
    """Manifest → quarantine → expectations; fail naming the files or classes at fault."""
    manifest = build_manifest(list_raw_files(paths.raw), cfg.max_pixels)
    quarantine = manifest.loc[~manifest["decodable"], ["path", "label", "reason"]]
    for row in quarantine.itertuples():
        log.warning("quarantined %s: %s", row.path, row.reason)
    with atomic_path(paths.quarantine) as tmp:
        quarantine.to_csv(tmp, index=False)
    usable = manifest[manifest["decodable"]].reset_index(drop=True)
    suite = run_suite(
        "validate", suite_tables(usable), suite_checks(cfg), docs_dir=paths.validation_docs
    )
    if not suite.success:
        raise DataError(
            f"validation failed ({paths.validation_docs / 'index.html'}):\n{format_failures(suite)}"
        )
    with atomic_path(paths.manifest) as tmp:
        manifest.to_parquet(tmp, index=False)
    metrics = summarise(manifest, usable, suite)
    write_json_atomic(paths.metrics_file("validate"), metrics)
    log.info(
        "validate: %d usable images in %d classes, %d quarantined, %d duplicates",
        metrics["images"],
        metrics["classes"],
        metrics["quarantined"],
        metrics["duplicates"],
    )
    return metrics


def main(params: Params) -> dict:
    return run(params.paths, params.validate)
