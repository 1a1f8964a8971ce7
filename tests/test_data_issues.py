"""data_issues: likely label errors, outliers, near-duplicates and confused classes, from
the embeddings; planted in data whose answer is known, and absent from data that is clean."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.data import issues
from pipeline.stages import data_issues, features, report
from pipeline.system import memo
from tests.support.images import colour_images
from tests.support.world import TinyWorld


def clusters(classes: int = 8, per_class: int = 60, dims: int = 48, spread: float = 0.6, seed=0):
    """Gaussian clusters, one per class, about as separable as a good backbone's
    embeddings of a clean dataset: (x, y)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dims))
    y = np.repeat(np.arange(classes), per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dims)), y


def flipped(
    y: np.ndarray, count: int, classes: int, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """``y`` with ``count`` labels moved at random into another class: (labels, rows)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(y), count, replace=False))
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, classes, size=count)) % classes
    return noisy, rows


def probe_probabilities(x, y, classes):
    return issues.out_of_fold_probabilities(
        issues.principal_axes(issues.unit_rows(x)), y, classes, folds=5, seed=0
    )


def test_planted_label_errors_are_found_first_with_their_true_class_suggested():
    x, y = clusters()
    noisy, rows = flipped(y, 12, 8)
    probs = probe_probabilities(x, noisy, 8)
    # the 12 lowest self-confidences are the 12 flips: precision and recall 1 at k = 12
    assert sorted(np.argsort(probs[np.arange(len(y)), noisy])[:12]) == list(rows)
    found = issues.label_issues(probs, noisy)
    # confident learning's estimate of how many: 8 here (8 to 12 over eight seeds of this
    # data; on Caltech-101 138 for 141 flips, BENCHMARKS.md)
    assert 8 <= len(found.rows) <= 12 and set(found.rows) <= set(rows)
    assert (found.suggested == y[found.rows]).all()
    assert (np.diff(found.score) <= 0).all() and found.score[-1] > 0.5


def test_clean_labels_give_few_issues():
    x, y = clusters()
    found = issues.label_issues(probe_probabilities(x, y, 8), y)
    assert len(found.rows) <= len(y) // 100  # at most 1% of a clean set


def test_no_image_is_scored_by_a_probe_that_saw_its_label():
    """A probe trained on every label would score a flipped image by its flipped label;
    out of fold, the flipped label gets a low probability."""
    x, y = clusters()
    noisy, rows = flipped(y, 12, 8)
    z = issues.principal_axes(issues.unit_rows(x))
    oof = issues.out_of_fold_probabilities(z, noisy, 8, folds=5, seed=0)
    assert oof[rows, noisy[rows]].max() < 0.5
    folds = issues.stratified_folds(noisy, 5, seed=0)
    assert sorted(np.bincount(folds)) == [96] * 5
    for label in range(8):  # every class dealt round the folds
        assert np.bincount(folds[noisy == label], minlength=5).min() >= 10


def test_outliers_are_the_images_far_from_every_other():
    x, y = clusters()
    far = np.random.default_rng(3).normal(size=(3, x.shape[1])) * 10
    unit = issues.unit_rows(np.vstack([x, far]))
    index, similarity = issues.nearest_neighbours(unit, 10)
    found, distance = issues.outliers(similarity, 3.0)
    assert sorted(found) == [480, 481, 482]
    assert (np.diff(distance) <= 0).all()
    _, clean_similarity = issues.nearest_neighbours(issues.unit_rows(x), 10)
    assert len(issues.outliers(clean_similarity, 3.0)[0]) == 0


def test_near_duplicates_are_pairs_with_different_labels_only():
    x, y = clusters()
    rng = np.random.default_rng(4)
    copies = x[[5, 70, 130]] + 0.01 * rng.normal(size=(3, x.shape[1]))
    labels = np.concatenate([y, [3, 1, 4]])  # copies of 5 (class 0), 70 (1), 130 (2)
    index, similarity = issues.nearest_neighbours(issues.unit_rows(np.vstack([x, copies])), 5)
    pairs = issues.near_duplicates(index, similarity, labels, 0.98)
    assert sorted((i, j) for i, j, _ in pairs) == [(5, 480), (130, 482)]  # most similar first
    assert pairs[0][2] >= pairs[1][2] >= 0.98


def test_classes_the_data_confuses_come_first():
    x, y = clusters()
    x[y == 3] = x[y == 2] + 0.3 * np.random.default_rng(5).normal(size=(60, x.shape[1]))
    pairs = issues.confused_classes(probe_probabilities(x, y, 8), y, top=3)
    assert pairs[0][:2] == (2, 3)
    assert pairs[0][2] >= 20 and 0.15 < pairs[0][3] <= 1


def test_neighbours_are_the_most_similar_others_in_every_block(monkeypatch):
    x, _ = clusters(classes=3, per_class=10, dims=8)
    unit = issues.unit_rows(x)
    expected_index, expected = issues.nearest_neighbours(unit, 29)  # everyone else
    monkeypatch.setattr(issues, "SIMILARITY_BLOCK", 7)
    index, similarity = issues.nearest_neighbours(unit, 4)
    assert (index != np.arange(30)[:, None]).all()
    assert np.allclose(similarity, expected[:, :4], atol=1e-6)
    gram = unit @ unit.T
    assert np.allclose(np.take_along_axis(gram, index, axis=1), similarity, atol=1e-6)


def colour_run(tmp_path, monkeypatch):
    """Colour classes whose labels come from a table with three of them flipped: the
    features stage has run with the ImageNet backbone (offline)."""
    images = colour_images(tmp_path / "images", per_class=20)
    rows = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    table = pd.DataFrame({"path": rows, "label": [r.split("/")[0] for r in rows]})
    classes = sorted(table["label"].unique())
    wrong = {}
    for n, i in enumerate((3, 25, 47)):
        wrong[table.loc[i, "path"]] = table.loc[i, "label"]
        shift = 1 + n % (len(classes) - 1)  # into another class
        table.loc[i, "label"] = classes[
            (classes.index(table.loc[i, "label"]) + shift) % len(classes)
        ]
    table.to_csv(tmp_path / "labels.csv", index=False)
    world = TinyWorld.build(
        tmp_path,
        monkeypatch,
        images=images,
        data={"source": str(images), "labels": str(tmp_path / "labels.csv")},
        model={"weights": "imagenet"},
        split={"ratios": {"train": 0.8, "val": 0.1, "test": 0.1}},
    )
    world.run(features)
    return world, wrong


def test_the_stage_finds_the_flips_of_a_labels_table_keeps_them_and_the_report_shows_them(
    tmp_path, monkeypatch
):
    world, wrong = colour_run(tmp_path, monkeypatch)
    params = world()
    metrics = world.run(data_issues)
    table = pd.read_csv(params.paths.data_issues, keep_default_na=False)
    assert list(table.columns) == data_issues.COLUMNS
    errors = table[table["issue"] == "label_error"]
    scored = pd.concat([pd.read_csv(params.paths.split_file(s)) for s in ("train", "val")])
    label_rows = pd.read_csv(params.paths.label_rows, keep_default_na=False)
    raw = f"{params.paths.raw.as_posix()}/"
    source_of = dict(zip(raw + label_rows["raw"], label_rows["path"], strict=True))
    expected = {p: label for p, label in wrong.items() if p in set(scored["path"].map(source_of))}
    assert len(expected) >= 2  # two or three of the flips are in train or val
    found = dict(zip(errors["source_path"], errors["suggested"], strict=True))
    assert {p: found.get(p) for p in expected} == expected  # found, the true class suggested
    assert len(errors) <= len(expected) + 2
    assert metrics["label_errors"] == len(errors) and metrics["reused"] is False
    assert metrics["images"] == len(scored)

    before = params.paths.data_issues.read_bytes()
    again = world.run(data_issues)
    assert again["reused"] is True and params.paths.data_issues.read_bytes() == before
    kept = memo.Store(params.paths.memo, memo.DATA_ISSUES).entries()
    assert len(kept) == 1
    changed = world.run(data_issues, data_issues={"neighbours": 5})
    assert changed["reused"] is False
    assert len(memo.Store(params.paths.memo, memo.DATA_ISSUES).entries()) == 2

    html = report.build(params)
    assert '<section id="data-issues">' in html
    assert f"{metrics['label_errors']} likely label error" in html
    assert html.count("<td>likely label error</td>") == metrics["label_errors"]
