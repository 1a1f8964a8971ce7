"""Stage ``onnx_check``: prove the ONNX file computes what the PyTorch model computed, on CPU.

Both models see the same preprocessed tensors of the whole test split; onnxruntime runs
on CPUExecutionProvider only (what downstream services use), even where a GPU exists.
Any bound in ``onnx_check`` that is not met fails the stage after writing
``metrics/onnx_check.json`` with ``passed: false`` and the reasons, so the numbers are
there to look at. Latency (batch 1) and throughput (batch ``batch_size``) are measured
with ``onnx_check.threads`` threads, for the fp32 and, when exported, the int8 model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import OnnxCheckParams, Params
from pipeline.data import ImageDataset, make_loader
from pipeline.errors import PipelineError
from pipeline.features import read_split
from pipeline.fsutil import read_json_or_empty, write_json_atomic
from pipeline.model import ModelCard, load_classifier
from pipeline.predict import OnnxClassifier
from pipeline.runtime import resolve

log = logging.getLogger(__name__)
BATCH1_IMAGES = 16  # images also run one at a time, to prove the batch axis is dynamic


class ParityError(PipelineError):
    """The ONNX model does not compute what the PyTorch model computed."""


def check_contract(onnx_model: OnnxClassifier, card: ModelCard, source: str) -> list[str]:
    """The metadata must round-trip the checkpoint's classes and preprocessing exactly."""
    problems = []
    contract = onnx_model.contract
    if contract.classes != card.classes:
        problems.append(f"{source}: metadata classes differ from the checkpoint's")
    if contract.preprocessing != card.preprocessing:
        problems.append(
            f"{source}: metadata preprocessing {contract.preprocessing} differs from the "
            f"checkpoint's {card.preprocessing}"
        )
    return problems


@dataclass
class Outputs:
    """Logits of every model on the test split, gathered batch by batch."""

    labels: list[np.ndarray] = field(default_factory=list)
    logits: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, name: str, values: np.ndarray) -> None:
        self.logits.setdefault(name, []).append(values)

    def stacked(self, name: str) -> np.ndarray:
        return np.concatenate(self.logits[name])


def speed(model: OnnxClassifier, batch: np.ndarray, cfg: OnnxCheckParams) -> dict[str, float]:
    """Latency percentiles one image at a time, and images/s at ``cfg.batch_size``."""
    singles = [batch[i : i + 1] for i in range(len(batch))]
    for x in singles[:5]:
        model.logits(x)  # warm-up: first runs allocate and pick kernels
    timings = []
    for i in range(cfg.latency_runs):
        start = time.perf_counter()
        model.logits(singles[i % len(singles)])
        timings.append((time.perf_counter() - start) * 1000)
    model.logits(batch)
    start = time.perf_counter()
    for _ in range(cfg.throughput_batches):
        model.logits(batch)
    elapsed = time.perf_counter() - start
    return {
        "cpu_latency_ms_p50": round(float(np.percentile(timings, 50)), 3),
        "cpu_latency_ms_p95": round(float(np.percentile(timings, 95)), 3),
        "cpu_throughput_ips": round(len(batch) * cfg.throughput_batches / elapsed, 1),
    }


def run(params: Params) -> dict:
    paths, cfg = params.paths, params.onnx_check
    model, card, _ = load_classifier(paths.model)
    runtime = resolve("cpu", "fp32")  # the reference: the exact fp32 model, on the CPU
    model = model.to(memory_format=torch.channels_last)
    sessions = {"onnx": OnnxClassifier(paths.onnx, cfg.threads)}
    if params.export.quantize:
        sessions["int8"] = OnnxClassifier(paths.onnx_int8, cfg.threads)
    failures = [p for name, s in sessions.items() for p in check_contract(s, card, name)]

    rows = read_split(paths, "test")
    lookup = {c: i for i, c in enumerate(card.classes)}
    dataset = ImageDataset(rows["path"], rows["label"].map(lookup), card.preprocessing)
    outputs, first_images, timing_batch = Outputs(), None, None
    with torch.inference_mode():
        for images, labels, _index in make_loader(dataset, runtime, cfg.batch_size):
            x = images.numpy()
            if first_images is None:
                first_images = x[:BATCH1_IMAGES].copy()
                # the timing batch: real test images, repeated up to batch_size
                timing_batch = np.resize(x, (cfg.batch_size, *x.shape[1:]))
            outputs.labels.append(labels.numpy())
            outputs.add(
                "torch", model(images.contiguous(memory_format=torch.channels_last)).numpy()
            )
            for name, session in sessions.items():
                outputs.add(name, session.logits(x))
    if first_images is None:
        raise PipelineError(f"{paths.split_file('test')} has no images to check against")

    y = np.concatenate(outputs.labels)
    reference, onnx_logits = outputs.stacked("torch"), outputs.stacked("onnx")
    singles = np.concatenate([sessions["onnx"].logits(image[None]) for image in first_images])
    torch_top1 = float((reference.argmax(1) == y).mean())
    metrics = {
        "images": int(len(y)),
        "max_abs_diff": float(np.abs(onnx_logits - reference).max()),
        "batch1_max_abs_diff": float(np.abs(singles - reference[: len(singles)]).max()),
        "top1_agreement": float((onnx_logits.argmax(1) == reference.argmax(1)).mean()),
        "onnx_top1": float((onnx_logits.argmax(1) == y).mean()),
        "torch_top1": torch_top1,
        "batch_sizes": [1, cfg.batch_size],
        "threads": cfg.threads,
        "size_mb": round(paths.onnx.stat().st_size / 1e6, 2),
        **speed(sessions["onnx"], timing_batch, cfg),
    }
    evaluated = read_json_or_empty(paths.metrics_file("evaluate")).get("finetuned", {})
    if "top1" in evaluated:
        metrics["evaluate_top1"] = evaluated["top1"]  # evaluate's figure (bf16 where it ran bf16)
    if metrics["max_abs_diff"] > cfg.max_abs_diff:
        failures.append(
            f"max |logit difference| {metrics['max_abs_diff']:.3g} > onnx_check.max_abs_diff "
            f"{cfg.max_abs_diff:g}"
        )
    if metrics["batch1_max_abs_diff"] > cfg.max_abs_diff:
        failures.append(
            f"batch-1 logits differ from the PyTorch ones by {metrics['batch1_max_abs_diff']:.3g}"
            f" > {cfg.max_abs_diff:g}: the dynamic batch axis is broken"
        )
    if metrics["top1_agreement"] < cfg.min_top1_agreement:
        failures.append(
            f"top-1 agreement {metrics['top1_agreement']:.4f} < onnx_check.min_top1_agreement "
            f"{cfg.min_top1_agreement:g}"
        )
    if abs(metrics["onnx_top1"] - torch_top1) > cfg.max_top1_gap:
        failures.append(
            f"ONNX top-1 {metrics['onnx_top1']:.4f} vs PyTorch {torch_top1:.4f}: gap above "
            f"onnx_check.max_top1_gap {cfg.max_top1_gap:g}"
        )
    if "int8" in sessions:
        int8_logits = outputs.stacked("int8")
        int8_top1 = float((int8_logits.argmax(1) == y).mean())
        metrics["int8"] = {
            "top1": int8_top1,
            "top1_drop": round(torch_top1 - int8_top1, 6),
            "top1_agreement": float((int8_logits.argmax(1) == reference.argmax(1)).mean()),
            "size_mb": round(paths.onnx_int8.stat().st_size / 1e6, 2),
            **speed(sessions["int8"], timing_batch, cfg),
        }
        if torch_top1 - int8_top1 > cfg.max_int8_drop:
            failures.append(
                f"int8 top-1 {int8_top1:.4f} is {torch_top1 - int8_top1:.4f} below fp32 "
                f"{torch_top1:.4f}: more than onnx_check.max_int8_drop {cfg.max_int8_drop:g}"
            )
    metrics["passed"] = not failures
    metrics["failures"] = failures
    write_json_atomic(paths.metrics_file("onnx_check"), metrics)
    log.info(
        "onnx_check: max |diff| %.2e, agreement %.4f, top-1 onnx %.4f / torch %.4f; "
        "batch 1 p50 %.1f ms, batch %d %.0f img/s",
        metrics["max_abs_diff"],
        metrics["top1_agreement"],
        metrics["onnx_top1"],
        torch_top1,
        metrics["cpu_latency_ms_p50"],
        cfg.batch_size,
        metrics["cpu_throughput_ips"],
    )
    if "int8" in metrics:
        q = metrics["int8"]
        log.info(
            "onnx_check int8: top-1 %.4f (drop %.4f), batch 1 p50 %.1f ms, %.0f img/s",
            q["top1"],
            q["top1_drop"],
            q["cpu_latency_ms_p50"],
            q["cpu_throughput_ips"],
        )
    if failures:
        raise ParityError(
            "the ONNX model does not match the PyTorch model:\n  - " + "\n  - ".join(failures)
        )
    return metrics


def main(params: Params) -> dict:
    return run(params)
