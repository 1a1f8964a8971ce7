"""Stage ``split``: a stratified, deterministic and stable train/val/test split.

Within each class, images are ordered by a hash of (seed, group key) and cut at the
target counts, so adding or removing a few images only moves images at the cut points.
A group is a set of images that must stay together: identical bytes (same sha256) or
the same perceptual hash (near-duplicates); a group spanning classes takes the split of
its first member in every class.
"""

from __future__ import annotations

import hashlib
import logging

import pandas as pd

from pipeline.config import Params, Paths, SplitParams
from pipeline.data import segments
from pipeline.data.expectations import Check, format_failures, run_suite
from pipeline.data.images import DEGENERATE_DHASHES
from pipeline.data.splits import COLUMNS, SPLITS, write_splits
from pipeline.errors import DataError
from pipeline.system.fsutil import atomic_path, write_json_atomic

log = logging.getLogger(__name__)


def group_keys(images: pd.DataFrame) -> pd.Series:
    """Group key per row: connected components of 'same sha256' or 'same perceptual hash'."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for sha, phash in zip(images["sha256"], images["phash"], strict=True):
        find(sha)
        if isinstance(phash, str) and phash not in DEGENERATE_DHASHES:
            union(sha, "phash:" + phash)
    # The representative is the smallest sha256 in the component (phash nodes sort last).
    return images["sha256"].map(find)


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def target_counts(n: int, cfg: SplitParams) -> dict[str, int]:
    """Images per split for a class of ``n``: largest-remainder rounding, at least one each."""
    if cfg.train_per_class is not None:
        rest = n - cfg.train_per_class
        val_share = cfg.ratios.val / (cfg.ratios.val + cfg.ratios.test)
        val = max(1, round(rest * val_share)) if rest >= 2 else 0
        return {"train": cfg.train_per_class, "val": val, "test": rest - val}
    exact = {s: n * getattr(cfg.ratios, s) for s in SPLITS}
    counts = {s: int(exact[s]) for s in SPLITS}
    for s in sorted(SPLITS, key=lambda s: exact[s] - counts[s], reverse=True)[
        : n - sum(counts.values())
    ]:
        counts[s] += 1
    for s in SPLITS:
        if counts[s] == 0:
            donor = max(SPLITS, key=lambda d: counts[d])
            counts[donor] -= 1
            counts[s] += 1
    return counts


def assign(images: pd.DataFrame, cfg: SplitParams) -> tuple[pd.DataFrame, list[str]]:
    """Add ``split`` and ``group`` columns to the usable images (path, label, sha256, phash).

    Returns the assigned rows and the classes dropped as too small.
    """
    images = images.copy()
    images["group"] = group_keys(images)
    images["rank"] = images["group"].map(lambda g: _rank(cfg.seed, g))
    sizes = images.groupby("label").size()
    small = sizes[sizes < cfg.min_class_size]
    if len(small):
        listing = ", ".join(f"{label!r} ({n})" for label, n in small.items())
        if not cfg.drop_small_classes:
            raise DataError(
                f"classes too small to give every split an image (need {cfg.min_class_size}): "
                f"{listing}; add images, or set split.drop_small_classes: true"
            )
        log.warning("dropping small classes (split.drop_small_classes): %s", listing)
        images = images[~images["label"].isin(small.index)]

    # Rank order (rank, sha256, path: a total order), then per class in name order. Plain
    # Python over the columns: a pandas operation per group cost seconds per 10k images.
    ordered = images.sort_values(["rank", "sha256", "path"])
    rows_of: dict[str, list[int]] = {}  # class → its rows' positions in rank order
    for position, label in enumerate(ordered["label"].tolist()):
        rows_of.setdefault(label, []).append(position)
    groups = ordered["group"].tolist()
    split_of: list[str] = [""] * len(ordered)
    group_split: dict[str, str] = {}
    for label in sorted(rows_of):
        positions = rows_of[label]
        remaining = target_counts(len(positions), cfg)
        members: dict[str, list[int]] = {}  # group → its rows here, groups in first-seen order
        for position in positions:
            members.setdefault(groups[position], []).append(position)
        pending = []
        for group, rows in members.items():
            if group in group_split:  # already placed by an earlier class
                for row in rows:
                    split_of[row] = group_split[group]
                remaining[group_split[group]] -= len(rows)
            else:
                pending.append((group, rows))
        # Cut the rank order at the remaining quotas; a group goes where its first member falls.
        bounds, total = [], 0
        for s in SPLITS:
            total += max(remaining[s], 0)
            bounds.append((total, s))
        placed = 0
        for group, rows in pending:
            split = next((s for bound, s in bounds if placed < bound), SPLITS[-1])
            for row in rows:
                split_of[row] = split
            group_split[group] = split
            placed += len(rows)
    images["split"] = pd.Series(split_of, index=ordered.index, dtype="object")
    return images.drop(columns=["rank"]), sorted(small.index.tolist())


def split_checks(cfg: SplitParams) -> dict[str, list[Check]]:
    return {
        "sha256_splits": [
            Check(
                "ExpectColumnValuesToBeBetween",
                {"column": "splits", "max_value": 1},
                describe="no sha256 sits in two splits",
            ),
        ],
        "proportions": [
            Check(
                "ExpectColumnValuesToBeBetween",
                {"column": "excess", "max_value": 0},
                describe="each class's count per split is within 2 images of its target "
                "(plus the size of a near-duplicate group that had to stay together)",
            ),
        ],
    }


def check_tables(assigned: pd.DataFrame, cfg: SplitParams) -> dict[str, pd.DataFrame]:
    sha_splits = assigned.groupby("sha256")["split"].nunique().rename("splits").to_frame()
    rows = []
    for label, members in assigned.groupby("label"):
        targets = target_counts(len(members), cfg)
        largest_group = int(members.groupby("group").size().max())
        for s in SPLITS:
            count = int((members["split"] == s).sum())
            tolerance = 2 + largest_group - 1
            rows.append(
                {
                    "label": label,
                    "split": s,
                    "count": count,
                    "target": targets[s],
                    "excess": abs(count - targets[s]) - tolerance,
                }
            )
    return {
        "sha256_splits": sha_splits,
        "proportions": pd.DataFrame(rows).set_index(["label", "split"]),
    }


def run(paths: Paths, cfg: SplitParams) -> dict:
    """Split the usable images of the manifest; write the split table and split.json."""
    if not segments.exists(paths.manifest):
        raise DataError(f"{paths.manifest} does not exist: run the validate stage first")
    manifest = segments.read_table(
        paths.manifest, "path", ["label", "sha256", "phash", "decodable"]
    )
    usable = manifest.loc[manifest["decodable"], ["path", "label", "sha256", "phash"]]
    assigned, dropped = assign(usable, cfg)
    tables = check_tables(assigned, cfg)
    suite = run_suite("split", tables, split_checks(cfg))
    if not suite.success:
        raise DataError(f"split check failed:\n{format_failures(suite)}")

    with atomic_path(paths.splits) as tmp:
        write_splits(assigned[COLUMNS], paths, tmp)
    metrics = {**summarise(assigned), "dropped_classes": dropped}
    write_json_atomic(paths.metrics_file("split"), metrics)
    log.info("split: %s", ", ".join(f"{s} {metrics['counts'][s]}" for s in SPLITS))
    return metrics


def summarise(assigned: pd.DataFrame) -> dict:
    groups = assigned.groupby("group")
    near_dup = assigned[groups["sha256"].transform("nunique") > 1]  # groups of look-alikes
    per_class = assigned.groupby(["label", "split"]).size().unstack(fill_value=0)
    return {
        "counts": {s: int((assigned["split"] == s).sum()) for s in SPLITS},
        "classes": int(assigned["label"].nunique()),
        "per_class": {
            str(label): {s: int(row.get(s, 0)) for s in SPLITS}
            for label, row in per_class.iterrows()
        },
        "duplicate_groups": int((groups.size() > 1).sum()),
        "near_duplicate_groups": int(near_dup["group"].nunique()),
        "near_duplicates": near_dup.groupby("group")["path"].apply(sorted).head(50).tolist(),
    }


def main(params: Params) -> dict:
    return run(params.paths, params.split)
