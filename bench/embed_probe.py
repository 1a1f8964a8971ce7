"""Time the features stage's embed() loop on the device: startup vs steady state.

python bench/embed_probe.py --images 6000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.stage_throughput import make_dataset  # noqa: E402
from pipeline.modeling.backbones import build_backbone  # noqa: E402
from pipeline.modeling.datasets import ImageDataset, make_loader  # noqa: E402
from pipeline.modeling.runtime import resolve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    runtime = resolve("auto", "auto")
    backbone = build_backbone("efficientnet_lite0", "none")
    model = backbone.module.to(runtime.device, memory_format=torch.channels_last).eval()
    result = {"workers": runtime.workers}
    with tempfile.TemporaryDirectory() as tmp:
        files = [
            str(f) for f in sorted(make_dataset(Path(tmp), 50, args.images // 50).rglob("*.jpg"))
        ]
        dataset = ImageDataset(files, [0] * len(files), backbone.preprocessing)
        for pin in (True, False):
            loader = make_loader(dataset, runtime, args.batch)
            loader.pin_memory = pin
            t0 = time.perf_counter()
            marks, n, wait = [], 0, 0.0
            with torch.inference_mode():
                t_fetch = time.perf_counter()
                for images, _y, index in loader:
                    wait += time.perf_counter() - t_fetch
                    with runtime.autocast():
                        feats = model(runtime.to_device(images))
                    feats.float().cpu()
                    n += len(index)
                    marks.append((n, time.perf_counter() - t0))
                    t_fetch = time.perf_counter()
            first = marks[0][1]
            steady = (marks[-1][0] - marks[0][0]) / (marks[-1][1] - marks[0][1])
            result[f"pin{pin}"] = {
                "first_batch_s": round(first, 2),
                "steady_ips": round(steady, 1),
                "total_s": round(marks[-1][1], 2),
                "waiting_for_loader_s": round(wait, 2),
            }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
