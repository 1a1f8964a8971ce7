"""Stage ``features``: the frozen backbone runs once per image; embeddings are kept by content.

The cache key of an embedding is (backbone, weights, preprocessing, engine, view) plus
the image's sha256, so adding or removing a few images computes only those. Outputs, in
split-CSV row order: ``<split>.npy`` (N, D) float32, ``train_aug.npy`` (N, V, D) when
``features.augmented_views`` > 0, and ``index.json`` (classes, backbone, preprocessing).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import FeaturesParams, ModelParams, Params, Paths
from pipeline.data.featurestore import FeatureCache, save_array
from pipeline.data.splits import SPLITS, read_split
from pipeline.modeling import engines
from pipeline.modeling.backbones import Backbone, build_backbone
from pipeline.modeling.datasets import (
    ImageDataset,
    RoundSampler,
    eval_geometry,
    make_loader,
    train_geometry,
)
from pipeline.modeling.runtime import Runtime, resolve
from pipeline.system import memo
from pipeline.system.diskfull import disk_full_is_an_error
from pipeline.system.fsutil import atomic_path, write_json_atomic

log = logging.getLogger(__name__)


def cache_key(backbone: Backbone, engine: engines.Engine, view: str) -> str:
    """Everything that changes an embedding except the image itself."""
    spec = {
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "pre": backbone.preprocessing.to_dict(),
        "engine": engine.name,
        "view": view,
    }
    return memo.digest(spec)


def embed(
    engine: engines.Engine,
    feature_dim: int,
    dataset: ImageDataset,
    runtime: Runtime,
    batch_size: int,
    desc: str,
    view: int = 0,
) -> np.ndarray:
    """Run the frozen backbone over a dataset of uint8 images; workers decode meanwhile."""
    out = np.empty((len(dataset), feature_dim), dtype=np.float32)
    sampler = RoundSampler(len(dataset), seed=0, shuffle=False, round_=view)
    loader = make_loader(dataset, runtime, batch_size, sampler=sampler)
    with tqdm(total=len(dataset), unit="img", desc=desc, disable=None) as bar:
        for images, _labels, index in loader:
            out[index.numpy()] = engine.embed(images)
            bar.update(len(index))
    return out


@dataclass
class EmbedStats:
    computed: int = 0
    seconds: float = 0.0  # inside the embedding loop only: the stage's real throughput

    def add(self, computed: int, seconds: float) -> None:
        self.computed += computed
        self.seconds += seconds


def cached_embeddings(
    backbone: Backbone,
    engine: engines.Engine,
    runtime: Runtime,
    rows: pd.DataFrame,
    cache: FeatureCache,
    batch_size: int,
    transform,
    stats: EmbedStats,
    view: int | None = None,
    seed: int = 0,
    desc: str = "features",
) -> np.ndarray:
    """Embeddings for ``rows`` (in order), computing only sha256s missing from the cache."""
    known = cache.load()
    todo = rows.drop_duplicates("sha256")
    todo = todo[~todo["sha256"].isin(known.keys())]
    if len(todo):
        keys = None if view is None else todo["sha256"].tolist()
        dataset = ImageDataset(todo["path"].tolist(), [0] * len(todo), transform, keys, seed)
        started = time.perf_counter()
        fresh = embed(engine, backbone.feature_dim, dataset, runtime, batch_size, desc, view or 0)
        stats.add(len(todo), time.perf_counter() - started)
        cache.add(todo["sha256"].tolist(), fresh)
        known.update(zip(todo["sha256"].tolist(), fresh, strict=True))
    return np.stack([known[sha] for sha in rows["sha256"]]).astype(np.float32)


def run(paths: Paths, model_cfg: ModelParams, cfg: FeaturesParams, device: str) -> dict:
    """Embed every split (and augmented train views), reusing cached embeddings."""
    started = time.perf_counter()
    runtime = resolve(device, cfg.precision)
    backbone = build_backbone(model_cfg.backbone, model_cfg.weights, model_cfg.resize)
    pre = backbone.preprocessing
    engine = engines.build(
        engines.choose(cfg.engine, cfg.precision, runtime),
        backbone.module,
        pre,
        runtime,
        paths.memo,
    )
    splits = {s: read_split(paths, s) for s in SPLITS}
    classes = sorted(set(splits["train"]["label"]))
    stats = EmbedStats()
    # All splits in one pass: one loader start-up, one cache read.
    everything = pd.concat(list(splits.values()), ignore_index=True)
    cache = FeatureCache(paths.memo, cache_key(backbone, engine, "eval"))
    all_features = cached_embeddings(
        backbone, engine, runtime, everything, cache, cfg.batch_size, eval_geometry(pre), stats
    )
    # A full disk is reported after atomic_path has removed its temporary folder.
    with (
        disk_full_is_an_error(paths.features, "paths.features"),
        atomic_path(paths.features) as tmp,
    ):
        tmp.mkdir()
        offset = 0
        for split, rows in splits.items():
            save_array(tmp / f"{split}.npy", all_features[offset : offset + len(rows)])
            offset += len(rows)
        if cfg.augmented_views:
            aug = train_geometry(pre, cfg.augment)
            views = []
            for view in range(cfg.augmented_views):
                key = cache_key(backbone, engine, f"aug{view}:seed{cfg.seed}:{cfg.augment}")
                views.append(
                    cached_embeddings(
                        backbone,
                        engine,
                        runtime,
                        splits["train"],
                        FeatureCache(paths.memo, key),
                        cfg.batch_size,
                        aug,
                        stats,
                        view,
                        cfg.seed,
                        desc=f"train view {view + 1}",
                    )
                )
            save_array(tmp / "train_aug.npy", np.stack(views, axis=1))
        index = {
            "classes": classes,
            "backbone": backbone.name,
            "weights": backbone.weights_id,
            "feature_dim": backbone.feature_dim,
            "preprocessing": pre.to_dict(),
            "engine": engine.name,
            "augmented_views": cfg.augmented_views,
        }
        (tmp / "index.json").write_text(
            json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    total = len(everything) + len(splits["train"]) * cfg.augmented_views
    seconds = time.perf_counter() - started
    metrics = {
        "images": len(everything),
        "computed": stats.computed,
        "reused": total - stats.computed,
        "seconds": round(seconds, 2),
        "embed_seconds": round(stats.seconds, 2),
        "images_per_second": round(stats.computed / stats.seconds, 1) if stats.computed else None,
        "device": str(runtime.device),
        "engine": engine.name,
        "engine_setup_seconds": round(engine.setup_seconds, 2),
        "feature_dim": backbone.feature_dim,
    }
    write_json_atomic(paths.metrics_file("features"), metrics)
    log.info(
        "features: %d computed with %s (%s img/s), %d reused, %.1f s in all",
        stats.computed,
        engine.name,
        metrics["images_per_second"],
        metrics["reused"],
        seconds,
    )
    return metrics


def main(params: Params) -> dict:
    return run(params.paths, params.model, params.features, params.device)
