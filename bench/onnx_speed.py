"""CPU inference side by side: the eager PyTorch baseline, ONNX Runtime fp32 and int8.

In a workspace after ``export``: one batch of real test images (``--batch``, default
onnx_check.batch_size), preprocessed once, then in interleaved rounds

- ``eager``: models/model.pt as a seed-style pipeline runs it: eager PyTorch, NCHW fp32;
- ``onnx_fp32``: models/model.onnx in onnxruntime (CPUExecutionProvider);
- ``onnx_int8``: models/model.int8.onnx (when exported),

all with ``onnx_check.threads`` threads. The median round gives each img/s, and the median
of the rounds' int8/fp32 ratios the paired speed-up. Accuracy
comes from onnx_check's own figures on the whole test split. Prints one JSON object.

    python bench/onnx_speed.py --root /path/to/workspace
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import images_per_second  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.data.rawstore import RawStore  # noqa: E402
from pipeline.data.splits import read_split  # noqa: E402
from pipeline.modeling.model import load_classifier  # noqa: E402
from pipeline.serving.predict import OnnxClassifier  # noqa: E402
from pipeline.system.fsutil import read_json_or_empty  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="batches per engine per round")
    args = parser.parse_args()
    os.chdir(args.root)
    params = load_params("params.yaml")
    paths, cfg = params.paths, params.onnx_check
    batch_size = args.batch or cfg.batch_size
    torch.set_num_threads(cfg.threads)
    model, card, _ = load_classifier(paths.model)
    rows = read_split(paths, "test")
    picks = np.linspace(0, len(rows) - 1, batch_size).round().astype(int)
    refs = RawStore.open(paths.raw).locate(rows["path"].iloc[picks])
    x = np.stack([card.preprocessing(load_rgb(ref)) for ref in refs])
    tensor = torch.from_numpy(x)
    runs = {}

    def eager() -> None:
        with torch.inference_mode():
            model(tensor)

    runs["eager"] = eager
    for name, file in (("onnx_fp32", paths.onnx), ("onnx_int8", paths.onnx_int8)):
        if file.exists():
            session = OnnxClassifier(file, cfg.threads)
            runs[name] = lambda s=session: s.logits(x)
    for run in runs.values():
        run()  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            rounds[name].append(images_per_second(run, batch_size, args.repeats))
    ips = {name: round(statistics.median(values), 1) for name, values in rounds.items()}
    # Each round measures the engines back to back, so a ratio within a round cancels the
    # machine's slower drifts (on a shared VM fp32 alone ranged 108-158 img/s run to run).
    paired = (
        statistics.median(
            a / b for a, b in zip(rounds["onnx_int8"], rounds["onnx_fp32"], strict=True)
        )
        if "onnx_int8" in rounds
        else None
    )
    checked = read_json_or_empty(paths.metrics_file("onnx_check"))
    result = {
        "batch_size": batch_size,
        "threads": cfg.threads,
        "images_per_second": ips,
        "onnx_fp32_vs_eager": round(ips["onnx_fp32"] / ips["eager"], 2)
        if "onnx_fp32" in ips
        else None,
        "int8_vs_fp32": round(ips["onnx_int8"] / ips["onnx_fp32"], 2)
        if "onnx_int8" in ips
        else None,
        "int8_vs_fp32_paired": round(paired, 2) if paired is not None else None,
        "test_top1": {
            "torch_fp32": checked.get("torch_top1"),
            "onnx_fp32": checked.get("onnx_top1"),
            "onnx_int8": checked.get("int8", {}).get("top1"),
        },
        "int8_top1_drop_pt": (
            round(100 * checked["int8"]["top1_drop"], 2) if "int8" in checked else None
        ),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
