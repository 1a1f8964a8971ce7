"""Stage ``features``: the frozen backbone runs once per image; embeddings are kept by content.

The cache key of an embedding is (backbone, weights, preprocessing, engine, view) plus
the image's sha256, so adding or removing a few images computes only those. Outputs, in
split-CSV row order: ``<split>.npy`` (N, D) float32, ``train_aug.npy`` (N, V, D) when
``features.augmented_views`` > 0, and ``index.json`` (classes, backbone, preprocessing).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import FeaturesParams, ModelParams, Params, Paths
from pipeline.data.featurestore import FeatureCache, NpyRows, RowArrays
from pipeline.data.rawstore import RawStore
from pipeline.data.splits import SPLITS, read_splits, rows_of
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
    dataset: ImageDataset,
    runtime: Runtime,
    batch_size: int,
    desc: str,
    put: Callable[[np.ndarray, np.ndarray], None],
    view: int = 0,
) -> None:
    """Run the frozen backbone over a dataset of uint8 images (workers decode meanwhile);
    ``put(indices, embeddings)`` takes each batch as it is computed."""
    sampler = RoundSampler(len(dataset), seed=0, shuffle=False, round_=view)
    loader = make_loader(dataset, runtime, batch_size, sampler=sampler)
    with tqdm(total=len(dataset), unit="img", desc=desc, disable=None) as bar:
        for images, _labels, index in loader:
            put(index.numpy(), engine.embed(images))
            bar.update(len(index))


@dataclass
class EmbedStats:
    computed: int = 0
    seconds: float = 0.0  # inside the embedding loop only: the stage's real throughput

    def add(self, computed: int, seconds: float) -> None:
        self.computed += computed
        self.seconds += seconds


def cached_embeddings(
    engine: engines.Engine,
    runtime: Runtime,
    rows: pd.DataFrame,
    store: Callable[[], RawStore],
    cache: FeatureCache,
    out: RowArrays,
    batch_size: int,
    transform,
    stats: EmbedStats,
    view: int | None = None,
    seed: int = 0,
    desc: str = "features",
) -> None:
    """Embeddings for ``rows`` into ``out`` (row for row), computing only the sha256s
    missing from the cache. The cache is read a shard at a time and written into ``out``
    (files, row by row): memory holds a shard or a batch, never every embedding."""
    codes, shas = pd.factorize(rows["sha256"])  # an image's first row stands for its copies
    first = np.full(len(shas), len(codes), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(codes)))
    filled = np.zeros(len(shas), dtype=bool)
    lookup = pd.Index(shas)
    for kept_shas, kept in cache.shards():
        found = lookup.get_indexer(kept_shas)
        wanted = np.flatnonzero(found >= 0)
        wanted = wanted[~filled[found[wanted]]]
        out.put(first[found[wanted]], kept[wanted])
        filled[found[wanted]] = True
    todo = np.flatnonzero(~filled)
    if len(todo):
        todo_rows = first[todo]
        sources = store().locate(rows["path"].to_numpy()[todo_rows])
        keys = None if view is None else shas[todo].tolist()
        dataset = ImageDataset(sources, [0] * len(todo), transform, keys, seed)
        kept_upto = 0  # the images before it are in the cache: a crash later keeps them

        def keep(upto: int) -> None:
            nonlocal kept_upto
            for start in range(kept_upto, upto, cache.shard_rows):
                part = todo[start : min(start + cache.shard_rows, upto)]
                cache.add(shas[part].tolist(), out.take(first[part]))
            kept_upto = upto

        def put(index: np.ndarray, embeddings: np.ndarray) -> None:
            out.put(todo_rows[index], embeddings)  # batches come in order (no shuffling)
            done = int(index[-1]) + 1
            keep(done - done % cache.shard_rows)

        started = time.perf_counter()
        embed(engine, dataset, runtime, batch_size, desc, put, view or 0)
        stats.add(len(todo), time.perf_counter() - started)
        keep(len(todo))
    copies = np.flatnonzero(first[codes] != np.arange(len(codes)))
    for start in range(0, len(copies), cache.shard_rows):
        part = copies[start : start + cache.shard_rows]
        out.put(part, out.take(first[codes[part]]))


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
    table = read_splits(paths)
    splits = {s: rows_of(table, s) for s in SPLITS}
    store = functools.cache(lambda: RawStore.open(paths.raw))  # read only to embed images
    classes = sorted(set(splits["train"]["label"]))
    stats = EmbedStats()
    # All splits in one pass: one loader start-up, one cache read.
    everything = pd.concat(list(splits.values()), ignore_index=True)
    dim = backbone.feature_dim
    # A full disk is reported after atomic_path has removed its temporary folder.
    with (
        disk_full_is_an_error(paths.features, "paths.features"),
        atomic_path(paths.features) as tmp,
        contextlib.ExitStack() as opened,
    ):
        tmp.mkdir()
        files = [
            opened.enter_context(
                contextlib.closing(NpyRows.create(tmp / f"{s}.npy", (len(rows), dim)))
            )
            for s, rows in splits.items()
        ]
        if cfg.augmented_views:  # every file reserved before any work: a full disk fails now
            shape = (len(splits["train"]), cfg.augmented_views, dim)
            views = opened.enter_context(
                contextlib.closing(NpyRows.create(tmp / "train_aug.npy", shape))
            )
        cached_embeddings(
            engine,
            runtime,
            everything,
            store,
            FeatureCache(paths.memo, cache_key(backbone, engine, "eval")),
            RowArrays(files),
            cfg.batch_size,
            eval_geometry(pre),
            stats,
        )
        if cfg.augmented_views:
            aug = train_geometry(pre, cfg.augment)
            for view in range(cfg.augmented_views):
                key = cache_key(backbone, engine, f"aug{view}:seed{cfg.seed}:{cfg.augment}")
                cached_embeddings(
                    engine,
                    runtime,
                    splits["train"],
                    store,
                    FeatureCache(paths.memo, key),
                    RowArrays([views.view(view)]),
                    cfg.batch_size,
                    aug,
                    stats,
                    view,
                    cfg.seed,
                    desc=f"train view {view + 1}",
                )
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
