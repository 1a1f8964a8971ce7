"""features throughput side by side: seed-style baseline, the stage's engine, its forward-only ceiling.

Over the same images (every split of a workspace's ``data/splits``, in file order):

- ``baseline``: the same backbone run the way a hand-rolled pipeline does: eager PyTorch,
  NCHW fp32, each batch decoded and preprocessed in the main thread, then forwarded.
- ``stage``: the features stage's own loop (``features.embed``: loader workers decode and
  resize, the chosen engine normalises and computes), setup (export) reported apart.
- ``forward_only``: the same engine on pre-decoded uint8 batches of those images (the
  ceiling when loading is fully hidden behind compute).

Prints one JSON object. In a finished Caltech-101 workspace:

    python bench/features_speed.py --root /path/to/workspace            # all 8,677 images
    python bench/features_speed.py --root /path/to/workspace --limit 1024
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.data.rawstore import RawStore  # noqa: E402
from pipeline.data.splits import read_split  # noqa: E402
from pipeline.modeling import engines  # noqa: E402
from pipeline.modeling.backbones import build_backbone  # noqa: E402
from pipeline.modeling.datasets import ImageDataset, eval_geometry  # noqa: E402
from pipeline.modeling.runtime import resolve  # noqa: E402
from pipeline.stages.features import embed  # noqa: E402
from pipeline.stages.split import SPLITS  # noqa: E402


def spread(rows: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """``limit`` rows spread evenly over the file order (so over classes), or all of them."""
    if limit is None or limit >= len(rows):
        return rows
    picks = np.linspace(0, len(rows) - 1, limit).round().astype(int)
    return rows.iloc[picks].reset_index(drop=True)


def baseline(backbone, paths: list[str], batch_size: int) -> float:
    """Seed-style: decode then forward in one thread of control, eager NCHW fp32."""
    pre, model = backbone.preprocessing, backbone.module.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = np.stack([pre(load_rgb(p)) for p in paths[start : start + batch_size]])
            model(torch.from_numpy(batch)).numpy()
    return len(paths) / (time.perf_counter() - started)


def forward_only(engine: engines.Engine, paths: list[str], pre, batch_size: int, batches: int):
    """The engine alone on pre-decoded uint8 batches of real images (one warm-up batch)."""
    geometry = eval_geometry(pre)
    decoded = [
        torch.from_numpy(np.stack([geometry(load_rgb(p)) for p in paths[i : i + batch_size]]))
        for i in range(0, min(len(paths), batch_size * (batches + 1)), batch_size)
    ]
    decoded = [b for b in decoded if len(b) == batch_size] or decoded
    engine.embed(decoded[0])
    timed = decoded[1:] or decoded
    started = time.perf_counter()
    for batch in timed:
        engine.embed(batch)
    return sum(len(b) for b in timed) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="a workspace after split")
    parser.add_argument("--limit", type=int, default=None, help="images, spread over classes")
    parser.add_argument("--engine", default=None, help="features.engine (default: params.yaml)")
    parser.add_argument("--forward-batches", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.chdir(args.root)
    params = load_params("params.yaml")
    cfg = params.features
    rows = spread(pd.concat([read_split(params.paths, s) for s in SPLITS]), args.limit)
    paths = RawStore.open(params.paths.raw).locate(rows["path"])
    runtime = resolve(params.device, cfg.precision)
    backbone = build_backbone(params.model.backbone, params.model.weights, params.model.resize)
    pre = backbone.preprocessing

    base = baseline(backbone, paths, cfg.batch_size)
    engine = engines.build(
        engines.choose(args.engine or cfg.engine, cfg.precision, runtime),
        backbone.module,
        pre,
        runtime,
        params.paths.memo,
    )
    dataset = ImageDataset(paths, [0] * len(paths), eval_geometry(pre))
    started = time.perf_counter()
    out = np.empty((len(paths), backbone.feature_dim), dtype=np.float32)
    embed(engine, dataset, runtime, cfg.batch_size, "stage", out.__setitem__)
    stage = len(paths) / (time.perf_counter() - started)
    ceiling = forward_only(engine, paths, pre, cfg.batch_size, args.forward_batches)
    result = {
        "images": len(paths),
        "backbone": backbone.name,
        "batch_size": cfg.batch_size,
        "device": str(runtime.device),
        "threads": torch.get_num_threads(),
        "loader_workers": runtime.workers,
        "cpu": platform.processor() or platform.machine(),
        "baseline_ips": round(base, 1),
        "engine": engine.name,
        "engine_setup_s": round(engine.setup_seconds, 1),
        "stage_ips": round(stage, 1),
        "forward_only_ips": round(ceiling, 1),
        "stage_vs_baseline": round(stage / base, 2),
        "stage_vs_forward_only": round(stage / ceiling, 3),
        # the same for 1,000 images or 8,677 when nothing holds the decoded dataset
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
