"""Where the image loader's time goes: decode, resize/crop, normalise, and DataLoader scaling.

python bench/loader_probe.py --images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.stage_throughput import make_dataset  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.modeling.backbones import build_backbone  # noqa: E402
from pipeline.modeling.datasets import ImageDataset, make_loader  # noqa: E402
from pipeline.modeling.runtime import Runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    pre = build_backbone("efficientnet_lite0", "none").preprocessing
    result = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(make_dataset(Path(tmp), 20, args.images // 20).rglob("*.jpg"))
        n = min(300, len(files))
        t = time.perf_counter()
        imgs = [load_rgb(f) for f in files[:n]]
        result["decode_ms"] = round((time.perf_counter() - t) / n * 1000, 3)
        t = time.perf_counter()
        crops = [pre.resize_crop(i) for i in imgs]
        result["resize_crop_ms"] = round((time.perf_counter() - t) / n * 1000, 3)
        t = time.perf_counter()
        for c in crops:
            pre.normalise(np.asarray(c))
        result["normalise_ms"] = round((time.perf_counter() - t) / n * 1000, 3)
        dataset = ImageDataset([str(f) for f in files], [0] * len(files), pre)
        for workers in (0, 4, 8, 16):
            for batch in (32, 256):
                if workers == 0 and batch == 256:
                    continue
                runtime = Runtime(torch.device("cpu"), False, workers)
                t = time.perf_counter()
                count = 0
                for images, _y, _i in make_loader(dataset, runtime, batch):
                    count += len(images)
                    if workers == 0 and count >= 500:
                        break
                result[f"loader_w{workers}_b{batch}_ips"] = round(
                    count / (time.perf_counter() - t), 1
                )
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
