"""Scores for a classifier's logits: accuracy, per-class figures, calibration, confusion.

Pure numpy (no torch), so ``evaluate`` can score any model that yields an ``(N, C)``
array of logits and an ``(N,)`` array of integer labels, with ``classes`` naming the
columns in index order. Predictions are ``argmax`` of the logits, ties to the lower
index, and every ranking here breaks ties the same way so top-1 always equals argmax.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.system.fsutil import atomic_path

# The two models evaluate scores (the keys of metrics/evaluate.json), with their names on the page.
MODELS = {"head": "head only", "finetuned": "fine-tuned"}

log = logging.getLogger(__name__)

# Temperatures outside this range mean the logits are degenerate (all-equal or perfectly
# separated), not that they need calibrating; the fit stops at the bound and says so.
TEMPERATURE_BOUNDS = (1e-2, 1e2)
# Above this many classes a heat map's tick labels overlap into a black band.
MAX_TICK_LABELS = 40


# --- input checks ---------------------------------------------------------------------


def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits as float64 (N, C) and labels as int64 (N,), or a ValueError naming the problem."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty (N, C) array, got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating) and not np.issubdtype(logits.dtype, np.integer):
        raise ValueError(f"logits must be numeric, got dtype {logits.dtype}")
    logits = logits.astype(np.float64, copy=False)
    if not np.all(np.isfinite(logits)):
        raise ValueError(
            "logits contain NaN or inf; check the model's outputs (e.g. an fp16 overflow)"
        )
    return logits, _check_labels(labels, logits.shape[0], logits.shape[1])


def _check_labels(labels: np.ndarray, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the scores, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"{name} must lie in 0..{n_classes - 1} for {n_classes} classes, "
            f"got {labels.min()}..{labels.max()}"
        )
    return labels


def _check_classes(classes: list[str], n_classes: int) -> None:
    if len(classes) != n_classes:
        raise ValueError(
            f"classes names {len(classes)} classes but the scores have {n_classes} columns"
        )


def _check_cm(cm: np.ndarray, classes: list[str]) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    _check_classes(classes, cm.shape[0])
    return cm


def _as_preds(logits_or_preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Predicted indices from (N, C) logits (argmax) or from (N,) indices as they are."""
    arr = np.asarray(logits_or_preds)
    if arr.ndim == 2:
        if arr.shape[1] != n_classes:
            raise ValueError(f"logits have {arr.shape[1]} columns, expected {n_classes} classes")
        return arr.argmax(axis=1).astype(np.int64)
    if arr.ndim == 1:
        return _check_labels(arr, arr.shape[0], n_classes, name="predictions")
    raise ValueError(f"expected (N, C) logits or (N,) predictions, got shape {arr.shape}")


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0.0 where den == 0, without a RuntimeWarning."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


# --- probabilities and accuracy -------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis of ``logits / temperature``.

    The row maximum is subtracted first so large logits do not overflow ``exp``.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / temperature)``."""
    logits, labels = _check_logits(logits, labels)
    return _nll(logits, labels, temperature)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    logp = _log_softmax(logits, temperature)
    return float(-logp[np.arange(labels.shape[0]), labels].mean())


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of samples whose label is among the ``k`` highest logits.

    Equal logits rank by class index, as ``argmax`` does, so ties never count as
    several hits and ``k=1`` matches the predictions used everywhere else.
    """
    logits, labels = _check_logits(logits, labels)
    n, n_classes = logits.shape
    if not 1 <= k <= n_classes:
        raise ValueError(f"k must be in 1..{n_classes} for {n_classes} classes, got {k}")
    true = logits[np.arange(n), labels][:, None]
    index = np.arange(n_classes)[None, :]
    rank = ((logits > true) | ((logits == true) & (index < labels[:, None]))).sum(axis=1)
    return float((rank < k).mean())


# --- per class --------------------------------------------------------------------------


def per_class_table(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Support, precision, recall (the class's accuracy) and F1 for each class, in index order.

    A class never predicted has precision 0.0, a class absent from ``labels`` recall 0.0,
    and F1 is 0.0 when both are: no division warnings, no NaN in the CSV.
    """
    logits, labels = _check_logits(logits, labels)
    n_classes = logits.shape[1]
    _check_classes(classes, n_classes)
    preds = logits.argmax(axis=1)
    support = np.bincount(labels, minlength=n_classes)
    predicted = np.bincount(preds, minlength=n_classes)
    tp = np.bincount(labels[preds == labels], minlength=n_classes)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return pd.DataFrame(
        {
            "class": list(classes),
            "support": support.astype(np.int64),
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    )


def mean_per_class_accuracy(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> float:
    """Mean of the per-class recalls over the classes present in ``labels``.

    Classes with no test sample are left out: their recall is undefined, and counting
    them as 0 would punish the model for a gap in the split. Equals sklearn's
    ``balanced_accuracy_score``.
    """
    table = per_class_table(logits, labels, classes)
    return float(table.loc[table["support"] > 0, "recall"].mean())


def macro_f1(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> float:
    """Mean F1 over the classes present in ``labels`` (absent ones left out, as above).

    Equals sklearn's ``f1_score(average="macro", labels=<classes present>, zero_division=0)``.
    """
    table = per_class_table(logits, labels, classes)
    return float(table.loc[table["support"] > 0, "f1"].mean())


# --- calibration ------------------------------------------------------------------------


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE over ``n_bins`` equal-width confidence bins (Guo et al., 2017).

    Confidence is the top probability; bin ``b`` holds confidences in
    ``(b/n_bins, (b+1)/n_bins]``. ECE is the support-weighted mean of
    ``|accuracy - mean confidence|`` over the bins.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty (N, C) array, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1 + 1e-9:
        raise ValueError("probs must lie in [0, 1]; pass softmax(logits), not the logits")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    # side="left": a confidence equal to an edge belongs to the bin that edge closes.
    bins = np.searchsorted(inner_edges, confidence, side="left")
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / probs.shape[0])


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T > 0`` that minimises the NLL of ``softmax(logits / T)``.

    Searched over ``log T`` with bounded Brent (deterministic, no start point to pick).
    The NLL is convex in ``1/T``, hence unimodal in ``log T``, so the minimum found is
    the global one. ``T > 1`` softens an overconfident model, ``T < 1`` sharpens an
    underconfident one; argmax, and so accuracy, does not change.
    """
    from scipy.optimize import minimize_scalar  # evaluate's alone: report never fits

    logits, labels = _check_logits(logits, labels)
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = math.exp(float(result.x))
    if min(abs(result.x - low), abs(result.x - high)) < 1e-3:
        log.warning(
            "temperature fit stopped at its bound T=%.3g (logits all equal or perfectly separated?)",
            temperature,
        )
    return temperature


# --- confusion ------------------------------------------------------------------------


def confusion_matrix(logits_or_preds: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (C, C): row = true class, column = predicted class.

    Takes (N, C) logits (argmax taken) or (N,) predicted indices.
    """
    preds = _as_preds(logits_or_preds, n_classes)
    labels = _check_labels(labels, preds.shape[0], n_classes)
    flat = np.bincount(labels * n_classes + preds, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def most_confused(cm: np.ndarray, classes: list[str], top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` largest off-diagonal cells as ``{"true", "predicted", "count"}``.

    Largest count first; equal counts by true then predicted class name, so the list
    is the same on every run.
    """
    cm = _check_cm(cm, classes)
    rows, cols = np.nonzero(cm)
    pairs = [
        {"true": classes[i], "predicted": classes[j], "count": int(cm[i, j])}
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True)
        if i != j
    ]
    pairs.sort(key=lambda p: (-p["count"], p["true"], p["predicted"]))
    return pairs[: max(top, 0)]


def confusion_long_table(cm: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """The nonzero cells of ``cm`` as rows ``actual, predicted, count`` (row-major order)."""
    cm = _check_cm(cm, classes)
    rows, cols = np.nonzero(cm)
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame(
        {
            "actual": names[rows].tolist(),
            "predicted": names[cols].tolist(),
            "count": cm[rows, cols].astype(np.int64),
        }
    )


def prediction_rows(preds: np.ndarray, labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row ``actual, predicted`` per sample: the input DVC's ``confusion`` plot template wants.

    ``preds`` may be (N,) indices or (N, C) logits.
    """
    preds = _as_preds(preds, len(classes))
    labels = _check_labels(labels, preds.shape[0], len(classes))
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame({"actual": names[labels].tolist(), "predicted": names[preds].tolist()})


def save_confusion_png(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Write a row-normalised heat map of ``cm`` to ``path`` as PNG, atomically.

    Rows are normalised so a rare class's errors show as clearly as a common one's.
    The figure grows with the number of classes; above ``MAX_TICK_LABELS`` classes the
    tick labels are hidden since they would overlap (the CSVs carry the names).
    Uses a bare ``Figure`` (Agg canvas) rather than pyplot: no global backend switch,
    no figure left open in pyplot's registry, safe without a display.
    """
    from matplotlib.figure import Figure

    cm = _check_cm(cm, classes)
    n = cm.shape[0]
    rates = _safe_div(cm, cm.sum(axis=1, keepdims=True))
    side = float(np.clip(3.0 + 0.14 * n, 5.0, 18.0))
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="share of the true class")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"Confusion matrix, row-normalised\n{n} classes, {int(cm.sum())} samples", fontsize=10
    )
    if n <= MAX_TICK_LABELS:
        fontsize = 9 if n <= 20 else 7
        ax.set_xticks(range(n), labels=classes, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), labels=classes, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    with atomic_path(Path(path)) as tmp:
        # The temporary name ends in ".tmp-<pid>", so the format cannot come from it.
        fig.savefig(tmp, format="png")


# --- the summary evaluate writes ----------------------------------------------------------


def summary(
    logits: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    temperature: float,
    n_bins: int = 15,
) -> dict[str, Any]:
    """The headline figures for one model on one split, JSON-ready (floats to 6 places).

    ``top5`` is top-min(5, C). ``ece`` and ``nll`` are the raw model's (T = 1);
    ``ece_calibrated`` uses ``temperature``, which should be fitted on another split.
    """
    logits, labels = _check_logits(logits, labels)
    _check_classes(classes, logits.shape[1])
    k = min(5, logits.shape[1])
    figures = {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, k),
        "mean_per_class_acc": mean_per_class_accuracy(logits, labels, classes),
        "macro_f1": macro_f1(logits, labels, classes),
        "ece": expected_calibration_error(softmax(logits), labels, n_bins),
        "ece_calibrated": expected_calibration_error(softmax(logits, temperature), labels, n_bins),
        "temperature": float(temperature),
        "nll": _nll(logits, labels, 1.0),
    }
    out: dict[str, Any] = {key: round(float(value), 6) for key, value in figures.items()}
    out["n"] = int(labels.shape[0])
    return out
