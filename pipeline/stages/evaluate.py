"""Stage ``evaluate``: the head-only and the fine-tuned model on the test split, side by side.

Top-1/top-5, mean per-class accuracy, macro-F1, and calibration: a temperature is fitted
on val for each model (it travels with the model in ``models/calibration.json``) and
ECE is reported before and after it. Per-class tables, confusion matrices and the most
confused pairs land in ``reports/evaluate/``; the fine-tuned model's predictions feed
DVC's confusion plot and ``predictions_finetuned.csv`` (path, label, predicted, calibrated
confidence), from which the run report shows misclassified images.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import torch

from pipeline.config import EvaluateParams, Params, Paths
from pipeline.data.featurestore import labelled, load_features
from pipeline.data.rawstore import RawStore
from pipeline.data.splits import read_split
from pipeline.modeling.datasets import ImageDataset, make_loader
from pipeline.modeling.model import load_checkpoint, load_classifier, make_head
from pipeline.modeling.reference import ReferenceFeatures
from pipeline.modeling.runtime import resolve
from pipeline.modeling.training import predict_logits
from pipeline.reporting import scoring
from pipeline.reporting.scoring import MODELS
from pipeline.system.fsutil import atomic_path, write_json_atomic

log = logging.getLogger(__name__)


def head_logits(paths: Paths, classes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The head alone, on the cached val and test features."""
    card, checkpoint = load_checkpoint(paths.head)
    head = make_head(card.head)
    head.load_state_dict(checkpoint["state_dict"])
    head.eval()
    arrays, _index = load_features(paths)
    out = {}
    for split in ("val", "test"):
        data = labelled(paths, arrays, classes, split)
        with torch.inference_mode():
            out[split] = (head(torch.tensor(data.x)).numpy(), data.y)
    return out


def finetuned_logits(paths: Paths, cfg: EvaluateParams, device: str) -> tuple[dict, list[str]]:
    """The fine-tuned model, rebuilt from its checkpoint alone, on the val and test images.

    Where it runs in fp32 on the CPU, the pass is onnx_check's PyTorch reference too: its
    backbone features are kept (``pipeline/modeling/reference.py``) and the check reuses them.
    """
    model, card, checkpoint = load_classifier(paths.model)
    runtime = resolve(device, cfg.precision)
    reference = (
        ReferenceFeatures(paths.memo, card, checkpoint["state_dict"], lambda: model)
        if runtime.device.type == "cpu" and not runtime.bf16
        else None
    )
    model = model.to(runtime.device, memory_format=torch.channels_last)
    lookup = {c: i for i, c in enumerate(card.classes)}
    out = {}
    store = RawStore.open(paths.raw)
    for split in ("val", "test"):
        rows = read_split(paths, split)
        labels = rows["label"].map(lookup).to_numpy(dtype=np.int64)
        dataset = ImageDataset(store.locate(rows["path"]), labels, card.preprocessing)
        loader = make_loader(dataset, runtime, cfg.batch_size)
        if reference is not None:
            logits = reference.logits_over(rows["sha256"], (images for images, _y, _i in loader))
        else:
            logits = predict_logits(model, loader, runtime)[0].numpy()
        out[split] = (logits, labels)
    return out, card.classes


def report(
    name: str, logits: dict, classes: list[str], cfg: EvaluateParams, paths: Paths
) -> tuple[dict, float]:
    """Fit the temperature on val, score test, write this model's tables and heat map."""
    temperature = scoring.fit_temperature(*logits["val"])
    test_logits, test_y = logits["test"]
    summary = scoring.summary(test_logits, test_y, classes, temperature, n_bins=cfg.ece_bins)
    with atomic_path(paths.per_class_table(name)) as tmp:
        scoring.per_class_table(test_logits, test_y, classes).round(6).to_csv(tmp, index=False)
    cm = scoring.confusion_matrix(test_logits, test_y, len(classes))
    scoring.save_confusion_png(cm, classes, paths.confusion_image(name))
    pairs = pd.DataFrame(
        scoring.most_confused(cm, classes, top=20), columns=["true", "predicted", "count"]
    )
    with atomic_path(paths.most_confused_table(name)) as tmp:
        pairs.to_csv(tmp, index=False)
    log.info(
        "%s: test top-1 %.4f, mean per-class %.4f, ECE %.4f → %.4f at T=%.3f",
        name,
        summary["top1"],
        summary["mean_per_class_acc"],
        summary["ece"],
        summary["ece_calibrated"],
        temperature,
    )
    return summary, temperature


def joined_untrained(paths: Paths) -> bool:
    """Whether the model is backbone + head exactly as features and train_head left them.

    With ``finetune.epochs: 0`` nothing is trained, so the model's logits are the head's on
    the cached features; running every val and test image through it again would repeat
    the features stage (37 s of a 60 s head experiment on Caltech-101). Checked by content:
    the same head tensors, and a features index made from the model's backbone, weights
    and preprocessing.
    """
    card, model = load_checkpoint(paths.model)
    if model.get("params", {}).get("epochs") != 0:
        return False
    head_card, head = load_checkpoint(paths.head)
    index_file = paths.features / "index.json"
    index = json.loads(index_file.read_text(encoding="utf-8")) if index_file.exists() else {}
    same_head = head_card == card and all(
        torch.equal(model["state_dict"].get(f"head.{k}", torch.empty(0)), v)
        for k, v in head["state_dict"].items()
    )
    return same_head and (
        index.get("backbone"),
        index.get("weights"),
        index.get("preprocessing"),
    ) == (
        card.backbone,
        card.weights_id,
        card.preprocessing.to_dict(),
    )


def run(paths: Paths, cfg: EvaluateParams, device: str) -> dict:
    if joined_untrained(paths):
        log.info("finetune.epochs was 0: scoring backbone + head on the cached features")
        classes = load_checkpoint(paths.model)[0].classes
        head = head_logits(paths, classes)
        results = {"head": head, "finetuned": head}
    else:
        finetuned, classes = finetuned_logits(paths, cfg, device)
        results = {"head": head_logits(paths, classes), "finetuned": finetuned}
    finetuned = results["finetuned"]
    paths.evaluation.mkdir(parents=True, exist_ok=True)
    metrics, temperatures = {}, {}
    for name in MODELS:
        metrics[name], temperatures[name] = report(name, results[name], classes, cfg, paths)
    test_logits, test_y = finetuned["test"]
    with atomic_path(paths.confusion) as tmp:
        scoring.prediction_rows(test_logits.argmax(1), test_y, classes).to_csv(tmp, index=False)
    with atomic_path(paths.predictions_table()) as tmp:
        test_rows = read_split(paths, "test")  # the order finetuned_logits read it in
        probs = scoring.softmax(test_logits, temperatures["finetuned"])
        pd.DataFrame(
            {
                "path": test_rows["path"],
                "label": test_rows["label"],
                "predicted": np.asarray(classes, dtype=object)[probs.argmax(1)],
                "confidence": probs.max(1).round(6),
            }
        ).to_csv(tmp, index=False)
    write_json_atomic(paths.calibration, {"temperature": temperatures, "fitted_on": "val"})
    write_json_atomic(paths.metrics_file("evaluate"), metrics)
    return metrics


def main(params: Params) -> dict:
    return run(params.paths, params.evaluate, params.device)
