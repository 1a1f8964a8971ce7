"""Stage ``promote``: the new model (the challenger) against the production one (the
champion), on the same current test images, through onnxruntime as a service runs them;
every candidate becomes a version in the model registry, and ``production`` moves to it
only when the rule in ``promote.*`` says so (docs/registry.md).

Only test images the champion never trained or validated on count (its version's
``images.parquet`` says which it saw); a stable split can still move an image across a
cut point when data is added, and the metrics say how many were left out. When the class
set changed, both are scored on the images of the classes both know, each model's top-1
as it is (a model that answers with a class the other lacks is wrong on that image, as a
consumer would see it), and the reason says so. The rule: promote unless the test images
are evidence at ``promote.alpha`` that the challenger is worse (the exact one-sided
McNemar test on the images only one of them gets right, ``significance.py``), and, with
``promote.min_gain`` set, unless its top-1 gain is below that. A kept champion is a
result, not a failure: the stage succeeds and says "not promoted: <reason>". A registry
that cannot be reached fails the stage naming it, with production untouched.

The challenger is scored before the registry's lock is taken (the slow part); under the
lock, production is read again and, if another promoter moved it meanwhile, the
challenger is scored against the new champion before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Params, PromoteParams
from pipeline.data.images import ImageRef, load_rgb
from pipeline.data.rawstore import RawStore
from pipeline.data.splits import (
    SPLITS,
    in_split_order,
    read_split,
    read_splits,
    rows_digest,
    rows_of,
)
from pipeline.errors import PipelineError
from pipeline.registry.store import (
    IMAGES_FILE,
    INT8_FILE,
    MODEL_FILE,
    Alias,
    Registry,
)
from pipeline.reporting.significance import paired_outcome
from pipeline.serving.predict import OnnxClassifier
from pipeline.system.fsutil import (
    atomic_path,
    read_json_or_empty,
    write_json_atomic,
)

log = logging.getLogger(__name__)
BATCH = 32  # images decoded and run at a time; every model sees the same decoded images
IMAGE_COLUMNS = ["sha256", "label", "split"]


@dataclass
class Champion:
    """The production model: its alias, version record, session and the images it saw."""

    alias: Alias
    record: dict
    model: OnnxClassifier
    images: pd.DataFrame


def predictions(models: list[OnnxClassifier], files: list[ImageRef]) -> list[np.ndarray]:
    """Each model's top-1 class index on each image: decoded once (``load_rgb``), then
    preprocessed as each model's own metadata says, as ``predict`` does."""
    out: list[list[np.ndarray]] = [[] for _ in models]
    for start in range(0, len(files), BATCH):
        images = [load_rgb(f) for f in files[start : start + BATCH]]
        tensors: dict[str, np.ndarray] = {}  # one tensor batch per distinct preprocessing
        for i, model in enumerate(models):
            pre = model.contract.preprocessing
            key = json.dumps(pre.to_dict(), sort_keys=True)
            if key not in tensors:
                tensors[key] = np.stack([pre(img) for img in images])
            out[i].append(model.logits(tensors[key]).argmax(1))
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in out]


def accuracy(right: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Top-1 and mean per-class accuracy of ``right`` (bool per image)."""
    if len(right) == 0:
        return {"top1": None, "mean_class_accuracy": None}
    frame = pd.DataFrame({"label": labels, "right": right})
    return {
        "top1": round(float(right.mean()), 6),
        "mean_class_accuracy": round(float(frame.groupby("label")["right"].mean().mean()), 6),
    }


NOTHING_COMPARED = {
    "images": 0,
    "left_out": 0,
    "left_out_other_classes": 0,
    "challenger": {"top1": None, "mean_class_accuracy": None},
    "champion": {"top1": None, "mean_class_accuracy": None},
    "challenger_only_right": 0,
    "champion_only_right": 0,
    "p_value": None,
    "classes": {"compared": 0, "added": [], "removed": []},
}


def compare(
    champion: Champion | None, challenger: OnnxClassifier, test: pd.DataFrame, store: RawStore
) -> dict:
    """Both models on the test images (in ``store``) the champion never saw, of the classes
    both know (``NOTHING_COMPARED`` when there is no champion)."""
    if champion is None:
        return NOTHING_COMPARED
    seen = set(champion.images.loc[champion.images["split"].isin(["train", "val"]), "sha256"])
    old, new = champion.model.contract.classes, challenger.contract.classes
    common = [c for c in new if c in set(old)]
    unseen = test[~test["sha256"].isin(seen)]
    rows = unseen[unseen["label"].isin(set(common))]
    champion_pred, challenger_pred = predictions(
        [champion.model, challenger], store.locate(rows["path"])
    )
    labels = list(rows["label"])
    champion_right = np.array(
        [old[p] == y for p, y in zip(champion_pred, labels, strict=True)], bool
    )
    challenger_right = np.array(
        [new[p] == y for p, y in zip(challenger_pred, labels, strict=True)], bool
    )
    outcome = paired_outcome(champion_right, challenger_right)
    return {
        "images": len(rows),
        "left_out": len(test) - len(unseen),
        "left_out_other_classes": len(unseen) - len(rows),
        "challenger": accuracy(challenger_right, labels),
        "champion": accuracy(champion_right, labels),
        "challenger_only_right": outcome.gained,
        "champion_only_right": outcome.lost,
        "p_value": float(f"{outcome.worse_p_value():.6g}"),
        "classes": {
            "compared": len(common),
            "added": sorted(set(new) - set(old)),
            "removed": sorted(set(old) - set(new)),
        },
    }


def decide(figures: dict, cfg: PromoteParams, champion_version: int) -> tuple[str, str]:
    """``promoted`` or ``kept``, and a one-line reason."""
    n, p = figures["images"], figures["p_value"]
    lost, gained = figures["champion_only_right"], figures["challenger_only_right"]
    new, old = figures["challenger"]["top1"], figures["champion"]["top1"]
    classes = figures["classes"]
    note = ""
    if classes["added"] or classes["removed"]:
        changed = [
            f"added {', '.join(classes['added'])}" if classes["added"] else "",
            f"removed {', '.join(classes['removed'])}" if classes["removed"] else "",
        ]
        note = (
            f"; compared on the {classes['compared']} classes both know "
            f"({'; '.join(c for c in changed if c)})"
        )
    if n == 0:
        if cfg.min_gain is not None:
            return (
                "kept",
                f"no test image both can be compared on, so no gain of promote.min_gain {cfg.min_gain:g} is shown{note}",
            )
        return (
            "promoted",
            f"no test image both can be compared on: nothing says version {champion_version} is better{note}",
        )
    figures_text = (
        f"top-1 {new:.4f} vs {old:.4f} on {n} test images ({gained} only the challenger gets "
        f"right, {lost} only the champion), p = {p:.2g}"
    )
    if lost > gained and p < cfg.alpha:
        return (
            "kept",
            f"worse than version {champion_version}: {figures_text} < promote.alpha {cfg.alpha:g}{note}",
        )
    if cfg.min_gain is not None and new - old < cfg.min_gain:
        return (
            "kept",
            f"gain {new - old:+.4f} below promote.min_gain {cfg.min_gain:g}: {figures_text}{note}",
        )
    return "promoted", f"not worse than version {champion_version}: {figures_text}{note}"


def data_lineage(params: Params) -> dict:
    """The split tables' sha256s, and one digest of the three: which data made the model."""
    table = read_splits(params.paths)
    splits = {split: rows_digest(rows_of(table, split)) for split in SPLITS}
    digest = hashlib.sha256("\n".join(splits[s] for s in SPLITS).encode()).hexdigest()
    return {"digest": digest, "splits": splits}


def images_table(params: Params) -> pd.DataFrame:
    """sha256, label and split of every image of this run's data."""
    return in_split_order(read_splits(params.paths))[IMAGE_COLUMNS]


def load_champion(registry: Registry, alias: Alias | None, tmp: Path) -> Champion | None:
    """The production version's model and images, downloaded and sha256-checked."""
    if alias is None:
        return None
    record = registry.version(alias.version)
    if record is None:
        raise PipelineError(
            f"{registry.where()}: production points at version {alias.version}, which has "
            "no version.json"
        )
    folder = tmp / f"v{alias.version}"
    folder.mkdir(exist_ok=True)
    model = registry.fetch(alias.version, MODEL_FILE, alias.sha256, folder / MODEL_FILE)
    entry = record["files"][IMAGES_FILE]
    images = registry.fetch(alias.version, IMAGES_FILE, entry["sha256"], folder / IMAGES_FILE)
    return Champion(alias, record, OnnxClassifier(model), pd.read_parquet(images))


def same_target(a: Alias | None, b: Alias | None) -> bool:
    return (a and (a.version, a.sha256)) == (b and (b.version, b.sha256))


def version_record(
    params: Params,
    challenger: OnnxClassifier,
    champion: Champion | None,
    figures: dict,
    decision: str,
    reason: str,
) -> dict:
    """A version's lineage: the decision, the data, what made the model, its figures."""
    meta = challenger.session.get_modelmeta().custom_metadata_map
    checked = read_json_or_empty(params.paths.metrics_file("onnx_check"))
    return {
        "decision": decision,
        "reason": reason,
        "champion_version": champion.alias.version if champion else None,
        "classes": challenger.contract.classes,
        "data": data_lineage(params),
        # what made the file, from its own metadata (export: pipeline/system/provenance.py)
        "params_sha256": meta.get("params_sha256"),
        "git_commit": meta.get("git_commit"),
        "git_dirty": meta.get("git_dirty"),
        "metrics": {
            "promote": figures,
            "onnx_top1": checked.get("onnx_top1"),
            "evaluate_top1": checked.get("evaluate_top1"),
            "int8_top1": checked.get("int8", {}).get("top1"),
        },
    }


def run(params: Params) -> dict:
    """Score against production → under the registry's lock: re-check production, decide,
    register the version, move production when promoted → write the outputs."""
    paths, cfg = params.paths, params.promote
    registry = Registry(cfg.registry, cfg.name)
    registry.check()  # a registry that is down fails here, naming it, before any work
    challenger = OnnxClassifier(paths.onnx)
    test = read_split(paths, "test")
    store = RawStore.open(paths.raw)
    with tempfile.TemporaryDirectory(prefix="promote-") as folder:
        tmp = Path(folder)
        champion = load_champion(registry, registry.alias(), tmp)
        figures = compare(champion, challenger, test, store)
        log.info(
            "promote: scored against production version %s; waiting for %s's lock",
            champion.alias.version if champion else None,
            registry.where(),
        )
        with registry.locked(cfg.lock_timeout_s, cfg.lock_lease_s):
            now = registry.alias()  # another promoter may have moved it meanwhile
            if not same_target(now, champion and champion.alias):
                log.info(
                    "promote: production moved to version %s meanwhile; scoring again",
                    now and now.version,
                )
                champion = load_champion(registry, now, tmp)
                figures = compare(champion, challenger, test, store)
            if champion is None:
                decision, reason = "first", "the first version: nothing was in production"
            else:
                decision, reason = decide(figures, cfg, champion.alias.version)
            files = {MODEL_FILE: paths.onnx, IMAGES_FILE: tmp / IMAGES_FILE}
            images_table(params).to_parquet(files[IMAGES_FILE], index=False)
            if params.export.quantize:
                files[INT8_FILE] = paths.onnx_int8
            record = version_record(params, challenger, champion, figures, decision, reason)
            version, registered = registry.register(files, record)  # read back, verified
            if decision != "kept":
                registry.set_alias(version, f"{decision}: {reason}", verified=registered)
            production = registry.alias()
    metrics = {
        "decision": decision,
        "version": version,
        "production_version": production.version,
        "champion_version": champion.alias.version if champion else None,
        "reason": reason,
        "registry": registry.where(),
        **figures,
    }
    seen = champion.images if champion else pd.DataFrame(columns=IMAGE_COLUMNS, dtype=str)
    write_outputs(paths, metrics, seen, production)
    return metrics


def write_outputs(paths, metrics: dict, champion_images: pd.DataFrame, production: Alias) -> None:
    """metrics/promote.json, the champion's images for the report, and what production is
    now; then say what happened."""
    with atomic_path(paths.champion_images) as tmp:
        champion_images[IMAGE_COLUMNS].to_parquet(tmp, index=False)
    write_json_atomic(
        paths.production,
        {
            "registry": metrics["registry"],
            "version": production.version,
            "sha256": production.sha256,
            "this_run": {"version": metrics["version"], "decision": metrics["decision"]},
        },
    )
    write_json_atomic(paths.metrics_file("promote"), metrics)
    if metrics["decision"] == "kept":
        log.warning(
            "not promoted: %s (version %d registered, production stays at version %d)",
            metrics["reason"],
            metrics["version"],
            production.version,
        )
    else:
        log.info(
            "promote: version %d is production (%s): %s",
            metrics["version"],
            metrics["decision"],
            metrics["reason"],
        )


def main(params: Params) -> dict:
    return run(params)
