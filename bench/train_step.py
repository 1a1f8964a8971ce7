"""Where a fine-tuning step's time goes: img/s per variant and torch.profiler's top operators.

On random 224 px batches (no loading: the loader keeps up, see BENCHMARKS.md), the
default backbone + an MLP head, all blocks trainable, AdamW, as ``finetune`` runs it:

- ``eager_nchw_fp32``: the seed-style baseline;
- ``channels_last_fp32``;
- ``channels_last_bf16``: what ``finetune`` uses where bf16 is native (autocast);

then torch.profiler over a few steps of the last variant, forward and backward together,
grouped by operator. Prints one JSON object.

    python bench/train_step.py --steps 6
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import images_per_second  # noqa: E402
from pipeline.modeling.backbones import build_backbone  # noqa: E402
from pipeline.modeling.runtime import cpu_has_fast_bf16  # noqa: E402


def make_step(
    channels_last: bool,
    bf16: bool,
    batch: int,
    classes: int,
    frozen_bn: bool = False,
    compile_: bool = False,
):
    backbone = build_backbone("efficientnet_lite0", "imagenet")
    model = nn.Sequential(
        backbone.module,
        nn.Linear(backbone.feature_dim, 1024),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(1024, classes),
    ).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    if frozen_bn:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    forward = torch.compile(model) if compile_ else model
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=layout)
    y = torch.randint(0, classes, (batch,))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step() -> None:
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with cast:
            logits = forward(x)
        loss = criterion(logits.float(), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--experiments", action="store_true", help="also frozen BN, torch.compile")
    args = parser.parse_args()
    variants = {
        "eager_nchw_fp32": (False, False),
        "channels_last_fp32": (True, False),
    }
    if cpu_has_fast_bf16():
        variants["channels_last_bf16"] = (True, True)
    result: dict = {"threads": torch.get_num_threads(), "batch": args.batch, "img_s": {}}
    profiled = None
    for name, (channels_last, bf16) in variants.items():
        profiled = make_step(channels_last, bf16, args.batch, args.classes)
        result["img_s"][name] = round(
            images_per_second(profiled, args.batch, args.steps, warmup=1), 1
        )
    if args.experiments:
        bf16 = cpu_has_fast_bf16()
        step = make_step(True, bf16, args.batch, args.classes, frozen_bn=True)
        result["img_s"]["frozen_batchnorm"] = round(
            images_per_second(step, args.batch, args.steps, warmup=1), 1
        )
        started = time.perf_counter()
        step = make_step(True, bf16, args.batch, args.classes, compile_=True)
        step()
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["img_s"]["compiled"] = round(
            images_per_second(step, args.batch, args.steps, warmup=1), 1
        )
    step = profiled
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(max(2, args.steps // 2)):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    result["profiled_variant"] = list(variants)[-1]
    result["top_ops_self_cpu_pct"] = {
        e.key: round(100 * e.self_cpu_time_total / total, 1) for e in top
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
