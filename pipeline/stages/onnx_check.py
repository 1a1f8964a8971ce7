"""Stage ``onnx_check``: prove the ONNX file computes what the PyTorch model computed, on CPU.

Both models see the same preprocessed tensors of the whole test split; onnxruntime runs
on CPUExecutionProvider only (what downstream services use), even where a GPU exists.
Each side's backbone runs over the split once per backbone: the PyTorch reference's
features and each ONNX file's backbone-part outputs are kept by content, and a head-only
change runs only the heads on them (the whole file is held to the parts, bit for bit, on
the first batch; ``metrics/onnx_check.json`` says under ``backbone_outputs`` which ran).
The fp32 logits must agree within ``max_abs_diff``, at batch 1 as at batch ``batch_size``.
The bounds on predictions (top-1 agreement, top-1 gap, the int8 drop) are bounds on true
rates, checked with one-sided tests at ``onnx_check.significance`` (``significance.py``):
a flipped image or two on a small test split is noise, a real regression still fails.
Any bound not met fails the stage after writing ``metrics/onnx_check.json`` with
``passed: false`` and the reasons, so the numbers are there to look at; a failure of the
int8 model alone says so (the fp32 file is still sound). The CPU, the SIMD features
onnxruntime's kernels use on it, and latency (batch 1) and throughput (batch
``batch_size``) with ``onnx_check.threads`` threads are recorded for both files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import OnnxCheckParams, Params
from pipeline.data.images import ImageRef
from pipeline.data.rawstore import RawStore
from pipeline.data.splits import read_split
from pipeline.errors import PipelineError
from pipeline.modeling.datasets import ImageDataset, make_loader
from pipeline.modeling.model import FEATURES, ModelCard, load_checkpoint, load_classifier
from pipeline.modeling.onnx_parts import OnnxParts, keep_outputs, load_outputs
from pipeline.modeling.reference import ReferenceFeatures
from pipeline.modeling.runtime import resolve
from pipeline.reporting.significance import (
    PairedOutcome,
    paired_outcome,
    rate_exceeds,
    rate_p_value,
)
from pipeline.serving.predict import OnnxClassifier
from pipeline.system.cpu import cpu_info
from pipeline.system.fsutil import read_json_or_empty, write_json_atomic

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
    """Every model's logits on the test split, batch by batch, and the labels."""

    labels: np.ndarray
    logits: dict[str, list[np.ndarray]] = field(default_factory=dict)

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


def open_sessions(params: Params, spinning: bool = True) -> dict[str, OnnxClassifier]:
    """onnxruntime CPU sessions: ``onnx`` (fp32) and, when exported, ``int8``.

    The passes over the test split share the two cores with the loader worker that decodes
    the images; there, threads that spin while they wait take its core, and the passes
    run 15% faster without (``spinning=False``: 16.3 against 19.2 s on Caltech-101's test
    split, two cores). The speed figures come from sessions as a service opens them.
    """
    paths, threads = params.paths, params.onnx_check.threads
    sessions = {"onnx": OnnxClassifier(paths.onnx, threads, spinning)}
    if params.export.quantize:
        sessions["int8"] = OnnxClassifier(paths.onnx_int8, threads, spinning)
    return sessions


@dataclass
class SplitPass:
    """What one pass over the test split gave: each file's logits batch by batch, the
    backbone outputs of the files run split, the PyTorch reference's features, and the
    first batch."""

    logits: dict[str, list[np.ndarray]] = field(default_factory=dict)
    backbone_outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    reference: list[np.ndarray] = field(default_factory=list)
    first: np.ndarray | None = None


def split_pass(
    dataset: ImageDataset,
    batch_size: int,
    whole: dict[str, OnnxClassifier],
    tapped: dict[str, OnnxParts],
    reference: ReferenceFeatures | None,
) -> SplitPass:
    """One pass over the test split, decoded in a loader worker: the ``whole`` files run as
    they are, the ``tapped`` ones also give their backbone part's output, and the PyTorch
    reference embeds the same tensors (when given)."""
    done = SplitPass()
    for images, _labels, _index in make_loader(dataset, resolve("cpu", "fp32"), batch_size):
        x = images.numpy()
        if done.first is None:
            done.first = x
        if reference is not None:
            done.reference.append(reference.embed(images))
        for name, session in whole.items():
            done.logits.setdefault(name, []).append(session.logits(x))
        for name, parts in tapped.items():
            logits, features = parts.tapped(x)
            done.logits.setdefault(name, []).append(logits)
            done.backbone_outputs.setdefault(name, []).append(features)
    return done


def collect_outputs(
    reference: ReferenceFeatures,
    sessions: dict[str, OnnxClassifier],
    card: ModelCard,
    rows,
    sources: list[ImageRef],
    cfg: OnnxCheckParams,
    cache: Path,
) -> tuple[Outputs, np.ndarray, np.ndarray, dict[str, str]]:
    """Every model's logits on the test split, batch by batch on the same tensors.

    The PyTorch reference runs in fp32 on the CPU, over these very tensors unless evaluate
    or an earlier check of a model with this backbone left its features
    (``pipeline/modeling/reference.py``); its logits are the model's head on them either way.
    Each ONNX file's backbone part likewise runs only where no earlier check of a file with
    this backbone part kept its output (``pipeline/modeling/onnx_parts.py``); its logits
    are then its head part's on the kept output, and the whole file must give the same
    logits, bit for bit, on the first batch. Returns the outputs, the first test images
    (to run one at a time), a timing batch (real test images, repeated up to
    ``batch_size``) and, per file, where its backbone outputs came from.
    """
    batch_size, shas = cfg.batch_size, list(rows["sha256"])
    lookup = {c: i for i, c in enumerate(card.classes)}
    labels = rows["label"].map(lookup).to_numpy(dtype=np.int64)
    dataset = ImageDataset(sources, labels, card.preprocessing)
    stored = reference.lookup(rows["sha256"])
    parts = {name: OnnxParts(s.path, cfg.threads, FEATURES) for name, s in sessions.items()}
    parts = {name: p for name, p in parts.items() if p.splittable}
    keys = {name: p.outputs_key(shas, batch_size, card.preprocessing) for name, p in parts.items()}
    kept = {name: load_outputs(cache, key, len(rows)) for name, key in keys.items()}
    kept = {name: outputs for name, outputs in kept.items() if outputs is not None}
    whole = {name: s for name, s in sessions.items() if name not in parts}
    tapped = {name: p for name, p in parts.items() if name not in kept}
    if stored is None or whole or tapped:
        done = split_pass(dataset, batch_size, whole, tapped, reference if stored is None else None)
    else:  # nothing to run over the whole split: only its first batch is decoded
        first = [dataset[i][0].numpy() for i in range(min(batch_size, len(dataset)))]
        done = SplitPass(first=np.stack(first))
    logits = done.logits
    for name, outputs in kept.items():
        logits[name] = [
            parts[name].head(outputs[i : i + batch_size])
            for i in range(0, len(outputs), batch_size)
        ]
        log.info("onnx_check: %s's backbone outputs on these images were kept", name)
    differ = [n for n in parts if not np.array_equal(sessions[n].logits(done.first), logits[n][0])]
    if differ:
        log.warning(
            "onnx_check: split at %r, %s computes other logits than as one file on the first "
            "test batch; running the whole file over the test split",
            FEATURES,
            " and ".join(differ),
        )
        logits.update(
            split_pass(dataset, batch_size, {n: sessions[n] for n in differ}, {}, None).logits
        )
    for name in tapped:
        if name not in differ:
            keep_outputs(cache, keys[name], np.concatenate(done.backbone_outputs[name]))
    if stored is None:
        stored = np.concatenate(done.reference)
        reference.keep(rows["sha256"], stored)
    else:
        log.info("onnx_check: the PyTorch fp32 features of these %d images were kept", len(rows))
    outputs = Outputs(labels, {**logits, "torch": [reference.logits(stored)]})
    origin = {
        name: "whole file"
        if name not in parts or name in differ
        else "kept"
        if name in kept
        else "computed"
        for name in sessions
    }
    first_images = done.first[:BATCH1_IMAGES].copy()
    timing_batch = np.resize(done.first, (batch_size, *done.first.shape[1:]))
    return outputs, first_images, timing_batch, origin


def parity_metrics(
    outputs: Outputs, onnx: OnnxClassifier, first_images: np.ndarray, cfg: OnnxCheckParams
) -> dict:
    """fp32 ONNX against PyTorch: logit differences (batched and batch 1) and predictions."""
    y = outputs.labels
    reference, onnx_logits = outputs.stacked("torch"), outputs.stacked("onnx")
    singles = np.concatenate([onnx.logits(image[None]) for image in first_images])
    torch_right, onnx_right = reference.argmax(1) == y, onnx_logits.argmax(1) == y
    disagreements = int((onnx_logits.argmax(1) != reference.argmax(1)).sum())
    paired = paired_outcome(torch_right, onnx_right)
    max_disagreement = 1 - cfg.min_top1_agreement
    return {
        "images": int(len(y)),
        "max_abs_diff": float(np.abs(onnx_logits - reference).max()),
        "batch1_max_abs_diff": float(np.abs(singles - reference[: len(singles)]).max()),
        "top1_agreement": float(1 - disagreements / len(y)),
        "disagreements": disagreements,
        "top1_agreement_p_value": round(rate_p_value(disagreements, len(y), max_disagreement), 6),
        "onnx_top1": float(onnx_right.mean()),
        "torch_top1": float(torch_right.mean()),
        "top1_gap_p_value": round(
            min(
                paired.p_value(cfg.max_top1_gap),
                PairedOutcome(paired.images, paired.gained, paired.lost).p_value(cfg.max_top1_gap),
            ),
            6,
        ),
        "significance": cfg.significance,
    }


def fp32_failures(metrics: dict, cfg: OnnxCheckParams) -> list[str]:
    """The bounds the fp32 ONNX model misses: exact on logits, tested on predictions."""
    failures = []
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
    n, alpha = metrics["images"], cfg.significance
    if rate_exceeds(metrics["disagreements"], n, 1 - cfg.min_top1_agreement, alpha):
        failures.append(
            f"top-1 agreement {metrics['top1_agreement']:.4f} ({metrics['disagreements']} of {n} "
            f"test images disagree): a true agreement of onnx_check.min_top1_agreement "
            f"{cfg.min_top1_agreement:g} is rejected (p = {metrics['top1_agreement_p_value']:.2g} "
            f"< onnx_check.significance {alpha:g})"
        )
    gap = metrics["onnx_top1"] - metrics["torch_top1"]
    if abs(gap) > cfg.max_top1_gap and metrics["top1_gap_p_value"] < alpha:
        failures.append(
            f"ONNX top-1 {metrics['onnx_top1']:.4f} vs PyTorch {metrics['torch_top1']:.4f}: a true "
            f"gap of at most onnx_check.max_top1_gap {cfg.max_top1_gap:g} is rejected (p = "
            f"{metrics['top1_gap_p_value']:.2g} < onnx_check.significance {alpha:g})"
        )
    return failures


def int8_metrics(outputs: Outputs, int8_file, cfg: OnnxCheckParams) -> dict:
    """int8 against the PyTorch fp32 reference: top-1, the images lost and gained, the test."""
    y = outputs.labels
    reference, int8_logits = outputs.stacked("torch"), outputs.stacked("int8")
    paired = paired_outcome(reference.argmax(1) == y, int8_logits.argmax(1) == y)
    top1 = float((int8_logits.argmax(1) == y).mean())
    return {
        "top1": top1,
        "top1_drop": round(paired.drop, 6),
        "lost": paired.lost,
        "gained": paired.gained,
        "drop_p_value": round(paired.p_value(cfg.max_int8_drop), 6),
        "passed": not paired.exceeds(cfg.max_int8_drop, cfg.significance),
        "top1_agreement": float((int8_logits.argmax(1) == reference.argmax(1)).mean()),
        "size_mb": round(int8_file.stat().st_size / 1e6, 2),
    }


def int8_failure(metrics: dict, cfg: OnnxCheckParams, int8_file, kernel: str) -> str:
    q = metrics["int8"]
    return (
        f"int8 top-1 {q['top1']:.4f} is {q['top1_drop']:.4f} below fp32 "
        f"{metrics['torch_top1']:.4f} ({q['lost']} of {metrics['images']} test images lost, "
        f"{q['gained']} gained): a true drop of at most onnx_check.max_int8_drop "
        f"{cfg.max_int8_drop:g} is rejected (p = {q['drop_p_value']:.2g} < "
        f"onnx_check.significance {cfg.significance:g}); int8 kernels here: {kernel}. "
        f"Only the optional int8 file {int8_file} is at fault"
    )


def run(params: Params) -> dict:
    """Sessions → outputs on the test split → parity metrics → the bounds a config sets."""
    paths, cfg = params.paths, params.onnx_check
    card, checkpoint = load_checkpoint(paths.model)
    sessions = open_sessions(params, spinning=False)
    failures = [p for name, s in sessions.items() for p in check_contract(s, card, name)]
    rows = read_split(paths, "test")
    if rows.empty:
        raise PipelineError(f"{paths.splits}: the test split has no images to check against")
    reference = ReferenceFeatures(
        paths.memo,
        card,
        checkpoint["state_dict"],
        lambda: load_classifier(paths.model)[0],
    )
    outputs, first_images, timing_batch, origin = collect_outputs(
        reference,
        sessions,
        card,
        rows,
        RawStore.open(paths.raw).locate(rows["path"]),
        cfg,
        paths.memo,
    )
    sessions = open_sessions(params)  # for the speed figures, as a service runs them
    cpu = cpu_info()
    metrics = {
        **parity_metrics(outputs, sessions["onnx"], first_images, cfg),
        "batch_sizes": [1, cfg.batch_size],
        "backbone_outputs": origin,
        "threads": cfg.threads,
        "cpu": {**cpu.to_dict(), "onnxruntime": onnxruntime_version()},
        "size_mb": round(paths.onnx.stat().st_size / 1e6, 2),
        **speed(sessions["onnx"], timing_batch, cfg),
    }
    evaluated = read_json_or_empty(paths.metrics_file("evaluate")).get("finetuned", {})
    if "top1" in evaluated:
        metrics["evaluate_top1"] = evaluated["top1"]  # evaluate's figure (bf16 where it ran bf16)
    failures += fp32_failures(metrics, cfg)
    int8_failed = False
    if "int8" in sessions:
        metrics["int8"] = {
            **int8_metrics(outputs, paths.onnx_int8, cfg),
            **speed(sessions["int8"], timing_batch, cfg),
        }
        int8_failed = not metrics["int8"]["passed"]
    if int8_failed:
        failures.append(int8_failure(metrics, cfg, paths.onnx_int8, cpu.int8_kernel))
    metrics["passed"] = not failures
    metrics["failures"] = failures
    write_json_atomic(paths.metrics_file("onnx_check"), metrics)
    log_summary(metrics, cfg)
    if failures:
        raise ParityError(
            failure_message(failures, int8_only=int8_failed and len(failures) == 1, paths=paths)
        )
    return metrics


def failure_message(failures: list[str], int8_only: bool, paths) -> str:
    if int8_only:
        return (
            f"the int8 model failed its accuracy gate; {paths.onnx} passed every check and "
            f"is sound:\n  - {failures[0]}.\n  Set export.quantize: false (and remove "
            f"{paths.onnx_int8} from export's outs in dvc.yaml) to export without int8."
        )
    return "the ONNX model does not match the PyTorch model:\n  - " + "\n  - ".join(failures)


def log_summary(metrics: dict, cfg: OnnxCheckParams) -> None:
    log.info(
        "onnx_check on %s (%s): max |diff| %.2e, agreement %.4f, top-1 onnx %.4f / torch %.4f; "
        "batch 1 p50 %.1f ms, batch %d %.0f img/s",
        metrics["cpu"]["model"],
        metrics["cpu"]["onnxruntime_int8_kernel"],
        metrics["max_abs_diff"],
        metrics["top1_agreement"],
        metrics["onnx_top1"],
        metrics["torch_top1"],
        metrics["cpu_latency_ms_p50"],
        cfg.batch_size,
        metrics["cpu_throughput_ips"],
    )
    if "int8" in metrics:
        q = metrics["int8"]
        log.info(
            "onnx_check int8: top-1 %.4f (drop %.4f: %d lost, %d gained, p = %.2g), "
            "batch 1 p50 %.1f ms, %.0f img/s",
            q["top1"],
            q["top1_drop"],
            q["lost"],
            q["gained"],
            q["drop_p_value"],
            q["cpu_latency_ms_p50"],
            q["cpu_throughput_ips"],
        )


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(params: Params) -> dict:
    return run(params)
