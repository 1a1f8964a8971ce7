"""Stage ``validate``: a manifest of every raw file, a quarantine, and a Great Expectations suite.

The files, their sizes and sha256s come from the raw store's index (download hashed each
file as it stored it). Each file is decoded once, the way every later stage will load it
(``images.load_rgb``), and what decoding found is kept by sha256 in the memo
(``factstore``): a rerun after new images arrive decodes only those (``decoded`` and
``reused`` in validate.json count both).
Files that cannot be used are quarantined with their reason (listed, never deleted);
the rest must pass the suite, whose Data Docs land in ``reports/validation/``.

The set of classes must also be the one the previous successful run accepted from the
same source, unless ``validate.allow_class_change`` is true: a class that appears or
vanishes between two unattended runs of one dataset (a renamed folder upstream, an edited
``data.exclude_classes``) changes what the model predicts, so it is a decision, not
something a schedule does silently. A new ``data.source`` (or ``data.member``) is a new
dataset: its classes are accepted as they are, with no flag to set and reset.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.config import DataParams, Params, Paths, ValidateParams
from pipeline.data import segments
from pipeline.data.expectations import Check, format_failures, run_suite
from pipeline.data.factstore import FactCache
from pipeline.data.images import (
    DEGENERATE_DHASHES,
    KNOWN_MODES,
    ImageFacts,
    ImageInfo,
    judge,
    probe_facts,
)
from pipeline.data.rawstore import RawStore
from pipeline.errors import DataError
from pipeline.sources.labels import ISSUES as LABEL_ISSUES
from pipeline.system.fsutil import atomic_path, write_json_atomic

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


def read_label_rows(path: Path) -> pd.DataFrame:
    """``paths.label_rows`` as download wrote it (a header only for class folders)."""
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the download stage first")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _map(function, items: list, desc: str, workers: int | None) -> list:
    """``function`` over ``items`` in order, in parallel processes, with a progress bar."""
    workers = workers or min(len(items) // 256 + 1, os.cpu_count() or 1)
    progress = dict(total=len(items), unit="img", desc=desc, disable=None)
    if workers <= 1:
        return [function(item) for item in tqdm(items, **progress)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(function, items, chunksize=64), **progress))


@dataclass(frozen=True)
class Manifest:
    """The manifest, and the facts decoded to make it (the rest came from kept facts)."""

    table: pd.DataFrame
    decoded: dict[str, ImageFacts]

    @property
    def reused(self) -> int:
        """Files whose verdict came from facts kept by an earlier run."""
        return int((~self.table["sha256"].isin(self.decoded.keys())).sum())


def build_manifest(
    store: RawStore,
    max_pixels: int,
    known: dict[str, ImageFacts] | None = None,
    workers: int | None = None,
) -> Manifest:
    """One row per file of the raw store, whose index has each file's size and sha256;
    only contents whose facts are not ``known`` (by sha256), or cannot be judged under
    ``max_pixels``, are decoded, once each."""
    known = known or {}
    index = store.index
    files = store.files()
    verdicts: dict[str, ImageInfo] = {}
    todo: dict[str, str] = {}  # sha256 → the first file with those bytes
    for (path, _), sha in zip(files, index["sha256"], strict=True):
        if sha in verdicts or sha in todo:
            continue
        info = judge(known[sha], max_pixels) if sha in known else None
        if info is None:
            todo[sha] = path
        else:
            verdicts[sha] = info
    probe = partial(probe_facts, max_pixels=max_pixels)
    refs = store.locate(todo.values())
    decoded = dict(zip(todo, _map(probe, refs, "validate", workers), strict=True))
    verdicts.update({sha: judge(facts, max_pixels) for sha, facts in decoded.items()})
    # every field is a scalar, so the instance's own dict is asdict's result, 10x faster
    as_row = {sha: vars(info) for sha, info in verdicts.items()}
    rows = [
        {"path": path, "label": label, "bytes": int(size), "sha256": sha, **as_row[sha]}
        for (path, label), size, sha in zip(files, index["size"], index["sha256"], strict=True)
    ]
    table = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    table = table.astype({"exif_orientation": "Int64", "width": "Int64", "height": "Int64"})
    return Manifest(table, decoded)


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
        "label_rows": [
            Check(
                "ExpectColumnValuesToBeNull",
                {"column": issue},
                hard=False,
                describe=f"data.labels: {meaning} (rows that are not are quarantined)",
            )
            for issue, meaning in LABEL_ISSUES.items()
        ],
        "phash_labels": [
            Check(
                "ExpectColumnValuesToBeBetween",
                {"column": "labels", "max_value": 1},
                hard=False,
                describe="a near-duplicate (same perceptual hash, other bytes: resized or "
                "re-encoded) never appears under two classes",
            ),
        ],
    }


def suite_tables(
    usable: pd.DataFrame, labels: list[str], label_rows: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """The tables the suite runs on: the usable rows of the manifest, what is derived from
    them, and the rows of the ``data.labels`` table (none for class folders).

    ``labels`` are all the classes in the raw data: a class whose every file was
    quarantined counts 0 images, so it fails the per-class minimum instead of vanishing.
    """
    classes = (  # rows named by class
        usable.groupby("label").size().reindex(labels, fill_value=0).rename("images").to_frame()
    )
    classes.index.name = "label"
    sha_labels = usable.groupby("sha256")["label"].nunique().rename("labels").to_frame()
    near = _near_duplicates(usable)
    phash_labels = near.groupby("phash")["label"].nunique().rename("labels").to_frame()
    return {
        "images": usable,
        "classes": classes,
        "sha256_labels": sha_labels,
        "label_rows": label_row_issues(label_rows),
        "phash_labels": phash_labels,
    }


def label_row_issues(label_rows: pd.DataFrame) -> pd.DataFrame:
    """One column per kind of issue, holding the path (and table row) of each row that has
    it: the suite's checks then name the offending files, not the issue."""
    where = label_rows["path"].where(
        label_rows["row"] == "", label_rows["path"] + " (row " + label_rows["row"] + ")"
    )
    return pd.DataFrame(
        {issue: where.where(label_rows["issue"] == issue) for issue in LABEL_ISSUES},
        index=label_rows.index,
    )


def _near_duplicates(usable: pd.DataFrame) -> pd.DataFrame:
    """Rows whose perceptual hash is shared by a file with other bytes (split groups them)."""
    hashed = usable[usable["phash"].notna() & ~usable["phash"].isin(DEGENERATE_DHASHES)]
    variants = hashed.groupby("phash")["sha256"].transform("nunique")
    return hashed[variants > 1]


def cross_class_duplicates(
    usable: pd.DataFrame, key: str = "sha256", limit: int = 20
) -> list[dict]:
    """Images filed under more than one class: the label noise worth a look.

    ``key="sha256"``: identical files; ``key="phash"``: near-duplicates (resized or
    re-encoded copies that share a perceptual hash but not their bytes).
    """
    rows = usable if key == "sha256" else _near_duplicates(usable)
    rows = rows[rows.groupby(key)["label"].transform("nunique") > 1]  # before the slow agg
    by_key = rows.groupby(key).agg(
        labels=("label", lambda s: sorted(set(s))), paths=("path", sorted)
    )
    shared = by_key[by_key["labels"].map(len) > 1].head(limit)
    return [{key: k, "labels": row.labels, "paths": row.paths} for k, row in shared.iterrows()]


def summarise(manifest: pd.DataFrame, usable: pd.DataFrame, suite, set_aside: pd.DataFrame) -> dict:
    """The contract metrics of validate.json; ``quarantined`` counts the undecodable files
    and the rows and files the labels table set aside (``set_aside_by_labels``)."""
    cross = cross_class_duplicates(usable, limit=len(usable))
    near = cross_class_duplicates(usable, key="phash", limit=len(usable))
    return {
        "files": len(manifest),
        "images": len(usable),
        "classes": int(usable["label"].nunique()),
        "quarantined": int((~manifest["decodable"]).sum()) + len(set_aside),
        "set_aside_by_labels": len(set_aside),
        "duplicates": int(len(usable) - usable["sha256"].nunique()),
        "duplicates_across_classes": len(cross),
        "duplicate_examples": cross[:20],
        "near_duplicates_across_classes": len(near),
        "near_duplicate_examples": near[:20],
        "exif_rotated": int((usable["exif_orientation"].fillna(1) > 1).sum()),
        "modes": {str(k): int(v) for k, v in usable["mode"].value_counts().sort_index().items()},
        "class_counts": {str(k): int(v) for k, v in usable.groupby("label").size().items()},
        "expectations": suite.summary(),
    }


@dataclass(frozen=True)
class AcceptedClasses:
    """A class list a successful run accepted, and the dataset it was accepted for, kept in
    ``paths.accepted_classes``.

    Why a file of its own: DVC deletes a stage's outputs before rerunning it, so the
    previous ``validate.json`` is gone by the time validate could compare with it. This
    one is declared ``persist: true`` in dvc.yaml (DVC keeps it across reruns) and
    ``cache: false`` (a small text file versioned beside the metrics, which a checkout
    of an older commit brings back with that commit's classes). Only a run that passes
    rewrites it; a failed run leaves the accepted list as it was.

    ``source`` is None for a list written before the source was recorded: its classes
    are still compared, whatever the source is now.
    """

    classes: list[str]
    source: dict[str, str | None] | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "classes": self.classes}


def dataset_identity(data: DataParams) -> dict[str, str | None]:
    """What names a dataset: the source as written in params.yaml, the member used, and the
    labels table when there is one (labels from another table, or from the folders instead,
    are another dataset's)."""
    identity = {"source": data.source, "member": data.member}
    return identity if data.labels is None else {**identity, "labels": data.labels}


def read_accepted_classes(path: Path) -> AcceptedClasses | None:
    """The accepted list in ``path``, or None when no run has accepted one yet."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable class list ({exc}); restore it or delete it") from exc
    classes = data.get("classes") if isinstance(data, dict) else None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f'{path}: expected {{"classes": [names]}}; restore it or delete it')
    source = data.get("source")
    if source is not None and not (
        isinstance(source, dict) and all(isinstance(v, str | None) for v in source.values())
    ):
        raise DataError(f"{path}: malformed 'source' {source!r}; restore it or delete it")
    return AcceptedClasses(classes, source)


def check_class_change(
    previous: AcceptedClasses | None,
    current: list[str],
    dataset: dict[str, str | None],
    allow: bool,
    source: Path,
) -> None:
    """Fail when ``current`` differs from the classes ``previous`` accepted for the same
    ``dataset``, unless allowed.

    No previous list (a first run, or the file deleted) accepts any classes; so does a
    different dataset (``data.source`` or ``data.member`` changed): a new dataset brings
    its own classes.
    """
    if previous is None:
        log.info("no accepted class list at %s yet: accepting %d classes", source, len(current))
        return
    if previous.source is not None and previous.source != dataset:
        log.info(
            "a new dataset (%s, was %s): accepting its %d classes",
            _describe(dataset),
            _describe(previous.source),
            len(current),
        )
        return
    added = sorted(set(current) - set(previous.classes))
    removed = sorted(set(previous.classes) - set(current))
    if not (added or removed):
        return
    change = f"added {_listing(added)}, removed {_listing(removed)}"
    if allow:
        log.warning("classes changed (validate.allow_class_change is true): %s", change)
        return
    raise DataError(
        f"the classes differ from those the last successful run accepted from "
        f"{_describe(dataset)} ({source}): {change}. If this is intended, set "
        "validate.allow_class_change: true in params.yaml for one run (the new list is then "
        "accepted) and back to false after. (A new data.source needs no flag.)"
    )


def _describe(dataset: dict[str, str | None]) -> str:
    member = dataset.get("member")
    return f"data.source {dataset.get('source')!r}" + (f", member {member!r}" if member else "")


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {names[:limit]!r}{more}"


def run(paths: Paths, cfg: ValidateParams, data: DataParams) -> dict:
    """Class-set check → manifest → quarantine → expectations; fail naming what is at fault."""
    store = RawStore.open(paths.raw)
    classes = sorted(set(store.index["label"]))
    accepted, dataset = paths.accepted_classes, dataset_identity(data)
    previous = read_accepted_classes(accepted)
    check_class_change(previous, classes, dataset, cfg.allow_class_change, accepted)
    facts = FactCache(paths.memo)
    built = build_manifest(store, cfg.max_pixels, facts.load())
    facts.add(built.decoded)  # facts stay true whatever the suite says of them
    manifest = built.table
    label_rows = read_label_rows(paths.label_rows)
    set_aside = label_rows.loc[label_rows["issue"] != "", ["path", "label", "reason"]]
    quarantine = pd.concat(
        [set_aside, manifest.loc[~manifest["decodable"], ["path", "label", "reason"]]],
        ignore_index=True,
    )
    for row in quarantine.itertuples():
        log.warning("quarantined %s: %s", row.path, row.reason)
    with atomic_path(paths.quarantine) as tmp:
        quarantine.to_csv(tmp, index=False)
    usable = manifest[manifest["decodable"]].reset_index(drop=True)
    suite = run_suite(
        "validate",
        suite_tables(usable, classes, label_rows),
        suite_checks(cfg),
        docs_dir=paths.validation_docs,
    )
    if not suite.success:
        raise DataError(
            f"validation failed ({paths.validation_docs / 'index.html'}):\n{format_failures(suite)}"
        )
    with atomic_path(paths.manifest) as tmp:
        segments.write_table(manifest, tmp, "path", paths.manifest)
    metrics = summarise(manifest, usable, suite, set_aside)
    metrics.update(decoded=len(built.decoded), reused=built.reused)
    write_json_atomic(paths.metrics_file("validate"), metrics)
    write_json_atomic(accepted, AcceptedClasses(classes, dataset).to_dict())
    log.info(
        "validate: %d usable images in %d classes, %d quarantined, %d duplicates; "
        "%d files decoded, %d judged from kept facts",
        metrics["images"],
        metrics["classes"],
        metrics["quarantined"],
        metrics["duplicates"],
        metrics["decoded"],
        metrics["reused"],
    )
    return metrics


def main(params: Params) -> dict:
    return run(params.paths, params.validate, params.data)
