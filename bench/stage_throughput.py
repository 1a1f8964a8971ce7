"""Throughput of the model stages on the device at hand, through the real stage code.

Builds a Caltech-like synthetic image folder (JPEGs of ~300x240, smooth content) and
its split CSVs, runs features → train_head → finetune with the given backbone, and prints one JSON object: features img/s, fine-tuning img/s, the backbone's
forward-only img/s on pre-decoded tensors (the ceiling for features), and the device.

    python bench/stage_throughput.py --classes 20 --per-class 100 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.config import overlay, parse_params  # noqa: E402
from pipeline.data.rawstore import RawStore  # noqa: E402
from pipeline.modeling.backbones import build_backbone  # noqa: E402
from pipeline.modeling.runtime import resolve  # noqa: E402
from pipeline.stages import download, features, finetune, train_head  # noqa: E402


def _write_class(args: tuple[Path, int, int]) -> None:
    folder, label, count = args
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label)
    for i in range(count):
        small = rng.integers(0, 256, size=(12, 15, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((300, 240), Image.Resampling.BICUBIC)
        img.save(folder / f"image_{i:04d}.jpg", quality=90)


def make_dataset(root: Path, classes: int, per_class: int) -> Path:
    with ProcessPoolExecutor() as pool:
        list(
            pool.map(
                _write_class, [(root / f"class_{c:03d}", c, per_class) for c in range(classes)]
            )
        )
    return root


def write_splits(store: RawStore, splits: Path) -> None:
    """70/10/20 per class by path order: the data stages after download are not what is
    measured here."""
    import pandas as pd

    from pipeline.data import segments
    from pipeline.data.splits import COLUMNS, KEY

    rows = []
    for label, files in store.index.groupby("label", sort=True):
        for i, (key, sha) in enumerate(zip(files["path"], files["sha256"], strict=True)):
            part = "train" if i < 0.7 * len(files) else "val" if i < 0.8 * len(files) else "test"
            rows.append((store.logical(key), label, sha, part))
    segments.write_table(pd.DataFrame(rows, columns=COLUMNS), splits, KEY)


def forward_only(backbone_name: str, device: str, batch: int, steps: int = 20) -> float:
    import torch

    runtime = resolve(device, "auto")
    model = (
        build_backbone(backbone_name, "imagenet")
        .module.to(runtime.device, memory_format=torch.channels_last)
        .eval()
    )
    x = runtime.to_device(torch.randn(batch, 3, 224, 224))
    with torch.inference_mode(), runtime.autocast():
        for _ in range(3):
            model(x)
        if runtime.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        if runtime.cuda:
            torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--features-batch", type=int, default=32)
    parser.add_argument("--finetune-batch", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        images = make_dataset(root / "images", args.classes, args.per_class)
        made = time.perf_counter() - t0
        ws = root / "ws"
        ws.mkdir()
        os.chdir(ws)
        params = parse_params(
            overlay(
                yaml.safe_load((REPO_ROOT / "params.yaml").read_text()),
                {
                    "data": {"source": str(images)},
                    "device": args.device,
                    "model": {"backbone": args.backbone},
                    "features": {"batch_size": args.features_batch},
                    "finetune": {
                        "epochs": args.epochs,
                        "batch_size": args.finetune_batch,
                        "patience": 99,
                    },
                },
            )
        )
        download.main(params)
        write_splits(RawStore.open(params.paths.raw), params.paths.splits)
        timings = {}
        for stage in (features, train_head, finetune):
            start = time.perf_counter()
            stage.main(params)
            timings[stage.__name__.split(".")[-1]] = round(time.perf_counter() - start, 2)
        feats = json.loads(params.paths.metrics_file("features").read_text())
        tuned = json.loads(params.paths.metrics_file("finetune").read_text())
    result = {
        "device": feats["device"],
        "engine": feats["engine"],
        "images": args.classes * args.per_class,
        "features_images_per_second": feats["images_per_second"],
        "finetune_images_per_second": tuned["train_images_per_second"],
        "forward_only_images_per_second": round(
            forward_only(args.backbone, args.device, args.features_batch), 1
        ),
        "stage_seconds": timings,
        "dataset_seconds": round(made, 1),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            result["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
