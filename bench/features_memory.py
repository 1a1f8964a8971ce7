"""Peak memory of the features stage as the dataset grows (issue #38), on the path a run
after a small growth takes at scale: every image's embedding is already in the cache, so
the stage reads the cache, writes the split arrays and computes nothing. What grows there
is what the stage holds; decoding and the backbone cost the same at any size.

For each ``--images`` N, a workspace with N split rows (80/10/10, 100 classes, distinct
sha256s; the image files need not exist, none is decoded) and N random cached embeddings
under the key the stage will look up; then ``python -m pipeline features`` with the code
of ``--code`` (default: this checkout), and its seconds and peak RSS from the run log.
Compare two commits by pointing ``--code`` at a checkout of each:

    python bench/features_memory.py --root /tmp/features-memory --images 30000 100000 300000
    python bench/features_memory.py --root /tmp/features-memory-old --code OLD_CHECKOUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))

from pipeline.config import load_params  # noqa: E402
from pipeline.data import segments  # noqa: E402
from pipeline.data.featurestore import FeatureCache  # noqa: E402
from pipeline.data.splits import COLUMNS, KEY  # noqa: E402
from pipeline.modeling import engines  # noqa: E402
from pipeline.modeling.backbones import build_backbone  # noqa: E402
from pipeline.modeling.runtime import resolve  # noqa: E402
from pipeline.stages.features import cache_key  # noqa: E402


def write_splits(workspace: Path, images: int) -> list[str]:
    """A split table of ``images`` rows; returns their sha256s in row order."""
    import pandas as pd

    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(images)]
    cuts = {"train": (0, images * 8 // 10), "val": (images * 8 // 10, images * 9 // 10)}
    cuts["test"] = (images * 9 // 10, images)
    rows = [
        (f"data/raw/class_{i % 100:03d}/img_{i:07d}.jpg", f"class_{i % 100:03d}", shas[i], split)
        for split, (start, stop) in cuts.items()
        for i in range(start, stop)
    ]
    table = pd.DataFrame(rows, columns=COLUMNS)
    segments.write_table(table, workspace / "data/splits", KEY)
    return shas


def cache_everything(workspace: Path, shas: list[str]) -> None:
    """Random embeddings for ``shas`` under the features stage's cache key, as a run that
    computed them would have left them."""
    params = load_params(workspace / "params.yaml")
    model, cfg = params.model, params.features
    runtime = resolve("cpu", cfg.precision)
    backbone = build_backbone(model.backbone, model.weights, model.resize)
    engine = engines.build(
        engines.choose(cfg.engine, cfg.precision, runtime),
        backbone.module,
        backbone.preprocessing,
        runtime,
        workspace / params.paths.memo,
    )
    cache = FeatureCache(workspace / params.paths.memo, cache_key(backbone, engine, "eval"))
    rng = np.random.default_rng(0)
    for start in range(0, len(shas), cache.shard_rows):  # a shard's embeddings in memory
        part = shas[start : start + cache.shard_rows]
        cache.add(part, rng.standard_normal((len(part), backbone.feature_dim), np.float32))


def measure(workspace: Path, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "features"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"features failed in {workspace}:\n{done.stderr[-3000:]}")
    log = json.loads((workspace / "logs/stages/features.json").read_text())
    metrics = json.loads((workspace / "metrics/features.json").read_text())
    return {
        "seconds": log["seconds"],
        "peak_rss_mb": log["peak_rss_mb"],
        "computed": metrics["computed"],
        "reused": metrics["reused"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a folder to work in (emptied)")
    parser.add_argument("--images", type=int, nargs="+", default=[30_000, 100_000, 300_000])
    parser.add_argument("--code", type=Path, default=CHECKOUT, help="the checkout to measure")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    for images in args.images:
        workspace = args.root / str(images)
        workspace.mkdir(parents=True)
        params = yaml.safe_load((args.code / "params.yaml").read_text(encoding="utf-8"))
        (workspace / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        cache_everything(workspace, write_splits(workspace, images))
        found = measure(workspace, args.code.resolve())
        sys.stdout.write(json.dumps({"images": images, "code": str(args.code), **found}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
