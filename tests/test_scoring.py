from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics

from pipeline.reporting import scoring

CLASSES = ["cat", "dog", "fox"]
# Seven samples worked through by hand:
#   true  logits          pred  top-2
#   cat   [3, 1, 0]       cat   cat dog
#   cat   [1, 2, 0]       dog   dog cat
#   dog   [0, 3, 1]       dog   dog fox
#   dog   [0, 1, 2]       fox   fox dog
#   fox   [2, 0, 1]       cat   cat fox
#   fox   [0, 1, 3]       fox   fox dog
#   fox   [3, 2, 1]       cat   cat dog   <- the only top-2 miss
LOGITS = np.array(
    [[3, 1, 0], [1, 2, 0], [0, 3, 1], [0, 1, 2], [2, 0, 1], [0, 1, 3], [3, 2, 1]], dtype=np.float32
)
LABELS = np.array([0, 0, 1, 1, 2, 2, 2])
PREDS = np.array([0, 1, 1, 2, 0, 2, 0])
CM = np.array([[1, 1, 0], [0, 1, 1], [2, 0, 1]])


def _sample_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from that row's distribution (inverse CDF)."""
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, np.ndarray]:
    """20k logits over 10 classes and labels drawn from their own softmax: calibrated."""
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(20_000, 10))
    return z, _sample_labels(scoring.softmax(z), rng)


# --- softmax and top-k ----------------------------------------------------------------


def test_softmax_is_stable_and_sums_to_one():
    probs = scoring.softmax(np.array([[1000.0, 1000.0, 0.0], [-1000.0, 0.0, 1000.0]]))
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(probs[0], [0.5, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(scoring.softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75])


def test_softmax_temperature_flattens():
    z = np.array([[2.0, 0.0]])
    np.testing.assert_allclose(scoring.softmax(z, temperature=2.0), scoring.softmax(z / 2))
    assert scoring.softmax(z, 10.0)[0, 0] < scoring.softmax(z)[0, 0]
    with pytest.raises(ValueError, match="temperature"):
        scoring.softmax(z, temperature=0.0)


def test_topk_accuracy_on_the_hand_case():
    assert scoring.topk_accuracy(LOGITS, LABELS, 1) == pytest.approx(3 / 7)
    assert scoring.topk_accuracy(LOGITS, LABELS, 2) == pytest.approx(6 / 7)
    assert scoring.topk_accuracy(LOGITS, LABELS, 3) == 1.0
    for k in (1, 2):
        assert scoring.topk_accuracy(LOGITS, LABELS, k) == pytest.approx(
            metrics.top_k_accuracy_score(LABELS, LOGITS, k=k, labels=[0, 1, 2])
        )


def test_topk_ties_rank_by_index_like_argmax():
    tied = np.zeros((3, 3))
    assert scoring.topk_accuracy(tied, np.array([0, 1, 2]), 1) == pytest.approx(1 / 3)
    assert scoring.topk_accuracy(tied, np.array([2, 2, 2]), 2) == 0.0
    assert scoring.topk_accuracy(tied, np.array([2, 2, 2]), 3) == 1.0


def test_topk_rejects_bad_inputs():
    with pytest.raises(ValueError, match="k must be in 1..3"):
        scoring.topk_accuracy(LOGITS, LABELS, 4)
    with pytest.raises(ValueError, match=r"labels must lie in 0..2"):
        scoring.topk_accuracy(LOGITS, np.array([0, 0, 1, 1, 2, 2, 3]), 1)
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        scoring.topk_accuracy(LOGITS, LABELS[:-1], 1)
    with pytest.raises(ValueError, match="integer"):
        scoring.topk_accuracy(LOGITS, LABELS.astype(float), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        scoring.topk_accuracy(np.full((2, 3), np.nan), np.array([0, 1]), 1)


# --- per class --------------------------------------------------------------------------


def test_per_class_table_by_hand_and_against_sklearn():
    table = scoring.per_class_table(LOGITS, LABELS, CLASSES)
    assert list(table.columns) == ["class", "support", "precision", "recall", "f1"]
    assert table["class"].tolist() == CLASSES
    assert table["support"].tolist() == [2, 2, 3]
    np.testing.assert_allclose(table["precision"], [1 / 3, 1 / 2, 1 / 2])
    np.testing.assert_allclose(table["recall"], [1 / 2, 1 / 2, 1 / 3])
    np.testing.assert_allclose(table["f1"], [0.4, 0.5, 0.4])
    p, r, f, s = metrics.precision_recall_fscore_support(LABELS, PREDS, labels=[0, 1, 2])
    np.testing.assert_allclose(table["precision"], p)
    np.testing.assert_allclose(table["recall"], r)
    np.testing.assert_allclose(table["f1"], f)
    assert table["support"].tolist() == s.tolist()


def test_mean_per_class_accuracy_and_macro_f1_by_hand():
    assert scoring.mean_per_class_accuracy(LOGITS, LABELS, CLASSES) == pytest.approx(4 / 9)
    assert scoring.macro_f1(LOGITS, LABELS, CLASSES) == pytest.approx(1.3 / 3)
    assert scoring.mean_per_class_accuracy(LOGITS, LABELS, CLASSES) == pytest.approx(
        metrics.balanced_accuracy_score(LABELS, PREDS)
    )
    assert scoring.macro_f1(LOGITS, LABELS, CLASSES) == pytest.approx(
        metrics.f1_score(LABELS, PREDS, average="macro")
    )


def test_classes_without_support_are_zero_and_left_out_of_the_means():
    # "gnu" has no sample but is predicted once (for a fox); "owl" is never seen nor predicted.
    logits = np.hstack([LOGITS, np.full((7, 2), -9.0)])
    logits[6, 3] = 9.0
    preds = logits.argmax(axis=1)
    classes = [*CLASSES, "gnu", "owl"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = scoring.per_class_table(logits, LABELS, classes)
        mpca = scoring.mean_per_class_accuracy(logits, LABELS, classes)
        mf1 = scoring.macro_f1(logits, LABELS, classes)
    assert (
        table.loc[3:, ["support", "precision", "recall", "f1"]].to_numpy().tolist()
        == [[0, 0, 0, 0]] * 2
    )
    assert not table.isna().any().any()
    present = [0, 1, 2]
    assert mpca == pytest.approx(
        metrics.recall_score(LABELS, preds, labels=present, average="macro")
    )
    assert mf1 == pytest.approx(
        metrics.f1_score(LABELS, preds, labels=present, average="macro", zero_division=0)
    )
    # The fox sent to gnu was already wrong, so the recalls stay 1/2, 1/2, 1/3: mean over 3, not 5.
    assert mpca == pytest.approx(4 / 9)


def test_per_class_table_wants_one_name_per_column():
    with pytest.raises(ValueError, match="classes names 2 classes but the scores have 3"):
        scoring.per_class_table(LOGITS, LABELS, ["cat", "dog"])


# --- calibration ------------------------------------------------------------------------


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin (0.8, 0.9]: conf 0.9, acc 0.5; bin (0.5, 0.6]: conf 0.6, acc 1.0; half the samples each.
    assert scoring.expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(
        0.5 * 0.4 + 0.5 * 0.4
    )
    # One bin: |mean accuracy - mean confidence| = |0.75 - 0.75|.
    assert scoring.expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.0)


def test_ece_bin_edges_close_on_the_right():
    # Confidence exactly 0.5 belongs to (0.25, 0.5], not (0.5, 0.75]; with 4 bins the
    # 0.5-confidence sample (wrong) and the 0.75 one (right) land in different bins.
    probs = np.array([[0.5, 0.5], [0.75, 0.25]])
    assert scoring.expected_calibration_error(probs, np.array([1, 0]), n_bins=4) == pytest.approx(
        0.5 * 0.5 + 0.5 * 0.25
    )


def test_ece_small_when_calibrated_large_when_overconfident(synthetic):
    z, labels = synthetic
    assert scoring.expected_calibration_error(scoring.softmax(z), labels) < 0.03
    assert scoring.expected_calibration_error(scoring.softmax(3 * z), labels) > 0.15


def test_ece_rejects_logits():
    with pytest.raises(ValueError, match="pass softmax"):
        scoring.expected_calibration_error(LOGITS, LABELS)


def test_fit_temperature_is_one_when_calibrated(synthetic):
    z, labels = synthetic
    assert scoring.fit_temperature(z, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_temperature_undoes_overconfidence():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(20_000, 10))
    labels = _sample_labels(scoring.softmax(z, temperature=3.0), rng)
    t = scoring.fit_temperature(z, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert scoring.nll(z, labels, t) < scoring.nll(z, labels)
    assert scoring.fit_temperature(z, labels) == t  # deterministic


def test_fit_temperature_sharpens_underconfidence():
    rng = np.random.default_rng(2)
    z = rng.normal(scale=1.0, size=(20_000, 10))
    labels = _sample_labels(scoring.softmax(z, temperature=0.5), rng)
    assert scoring.fit_temperature(z, labels) == pytest.approx(0.5, rel=0.1)


# --- confusion ------------------------------------------------------------------------


def test_confusion_matrix_from_logits_or_predictions():
    from_logits = scoring.confusion_matrix(LOGITS, LABELS, 3)
    np.testing.assert_array_equal(from_logits, CM)
    np.testing.assert_array_equal(scoring.confusion_matrix(PREDS, LABELS, 3), CM)
    np.testing.assert_array_equal(CM, metrics.confusion_matrix(LABELS, PREDS))
    with pytest.raises(ValueError, match="predictions must lie in 0..2"):
        scoring.confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="logits have 3 columns, expected 4"):
        scoring.confusion_matrix(LOGITS, LABELS, 4)


def test_most_confused_orders_by_count_then_names():
    assert scoring.most_confused(CM, CLASSES) == [
        {"true": "fox", "predicted": "cat", "count": 2},
        {"true": "cat", "predicted": "dog", "count": 1},
        {"true": "dog", "predicted": "fox", "count": 1},
    ]
    assert scoring.most_confused(CM, CLASSES, top=1) == [
        {"true": "fox", "predicted": "cat", "count": 2}
    ]
    assert scoring.most_confused(np.diag([3, 4, 5]), CLASSES) == []
    with pytest.raises(ValueError, match="square"):
        scoring.most_confused(CM[:2], CLASSES)


def test_confusion_long_table_keeps_nonzero_cells():
    table = scoring.confusion_long_table(CM, CLASSES)
    assert list(table.columns) == ["actual", "predicted", "count"]
    assert table.to_dict("records") == [
        {"actual": "cat", "predicted": "cat", "count": 1},
        {"actual": "cat", "predicted": "dog", "count": 1},
        {"actual": "dog", "predicted": "dog", "count": 1},
        {"actual": "dog", "predicted": "fox", "count": 1},
        {"actual": "fox", "predicted": "cat", "count": 2},
        {"actual": "fox", "predicted": "fox", "count": 1},
    ]


def test_prediction_rows_one_per_sample():
    rows = scoring.prediction_rows(PREDS, LABELS, CLASSES)
    assert list(rows.columns) == ["actual", "predicted"]
    assert len(rows) == 7
    assert rows.iloc[6].tolist() == ["fox", "cat"]
    pd.testing.assert_frame_equal(rows, scoring.prediction_rows(LOGITS, LABELS, CLASSES))
    counts = pd.crosstab(rows["actual"], rows["predicted"]).reindex(
        index=CLASSES, columns=CLASSES, fill_value=0
    )
    np.testing.assert_array_equal(counts.to_numpy(), CM)


@pytest.mark.parametrize("n_classes", [3, 60])
def test_save_confusion_png_writes_a_png_atomically(tmp_path, n_classes):
    classes = [f"class_{i:03d}" for i in range(n_classes)]
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5, size=(n_classes, n_classes))
    cm[0] = 0  # a class with no samples must not divide by zero
    target = tmp_path / "reports" / "confusion.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scoring.save_confusion_png(cm, classes, target)
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in target.parent.iterdir()] == ["confusion.png"]


def test_save_confusion_png_leaves_nothing_on_a_bad_matrix(tmp_path):
    with pytest.raises(ValueError, match="classes names"):
        scoring.save_confusion_png(CM, ["cat"], tmp_path / "confusion.png")
    assert list(tmp_path.iterdir()) == []


# --- summary ------------------------------------------------------------------------------


def test_summary_is_json_ready_and_rounded():
    out = scoring.summary(LOGITS, LABELS, CLASSES, temperature=1.0)
    assert set(out) == {
        "top1",
        "top5",
        "mean_per_class_acc",
        "macro_f1",
        "ece",
        "ece_calibrated",
        "temperature",
        "nll",
        "n",
    }
    assert json.loads(json.dumps(out)) == out
    assert all(type(v) is float for k, v in out.items() if k != "n")
    assert type(out["n"]) is int and out["n"] == 7
    assert out["top1"] == round(3 / 7, 6)
    assert out["top5"] == 1.0  # top-3 with three classes
    assert out["mean_per_class_acc"] == round(4 / 9, 6)
    assert out["macro_f1"] == round(1.3 / 3, 6)
    assert out["ece_calibrated"] == out["ece"]  # T = 1
    assert out["nll"] == pytest.approx(
        metrics.log_loss(LABELS, scoring.softmax(LOGITS), labels=[0, 1, 2]), abs=1e-6
    )


def test_summary_calibrated_ece_uses_the_temperature(synthetic):
    z, labels = synthetic
    out = scoring.summary(3 * z, labels, [f"c{i}" for i in range(10)], temperature=3.0, n_bins=10)
    assert out["temperature"] == 3.0
    assert out["ece"] > 0.15
    assert out["ece_calibrated"] < 0.03
