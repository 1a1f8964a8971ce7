"""What changed since the champion (pipeline/reporting/changes.py), on constructed tables
and embeddings whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.reporting import changes


def images(counts: dict[str, int], start: int = 0, split: str = "train") -> pd.DataFrame:
    """``counts[label]`` distinct images per class, sha256s numbered from ``start``."""
    rows = []
    for label, n in counts.items():
        rows += [
            {"sha256": f"{label}-{start + i:05d}", "label": label, "split": split} for i in range(n)
        ]
    return pd.DataFrame(rows, columns=["sha256", "label", "split"])


def clustered(table: pd.DataFrame, centres: dict[str, np.ndarray], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [centres[label] + rng.standard_normal(len(centres[label])) for label in table["label"]]
    )


def test_added_removed_and_relabelled_images_per_class():
    champion = images({"cat": 10, "dog": 10, "owl": 4})
    current = pd.concat(
        [
            images({"cat": 10, "dog": 7}),  # dog lost 3
            images({"cat": 5, "emu": 6}, start=100),  # cat gained 5; emu is new
            pd.DataFrame([{"sha256": "owl-00000", "label": "dog", "split": "val"}]),  # relabelled
            images({"cat": 1}),  # a copy of a cat image counts once
        ],
        ignore_index=True,
    )
    result = changes.since_champion(champion, current, embeddings=None)
    by = {c.label: c for c in result.classes}
    assert [c.label for c in result.classes] == ["cat", "dog", "emu", "owl"]
    assert (by["cat"].before, by["cat"].after, by["cat"].added, by["cat"].removed) == (10, 15, 5, 0)
    assert (by["dog"].before, by["dog"].after, by["dog"].added, by["dog"].removed) == (10, 8, 1, 3)
    assert (by["emu"].before, by["emu"].added) == (0, 6)
    assert (by["owl"].after, by["owl"].removed) == (0, 4)
    assert (result.before, result.after, result.added, result.removed) == (24, 29, 12, 7)
    assert by["owl"].share_before == pytest.approx(4 / 24) and by["owl"].share_after == 0
    assert not result.first and "no features" in result.drift_note


def test_first_version_has_no_champion_and_no_tests():
    current = images({"cat": 5, "dog": 3})
    result = changes.since_champion(images({}), current, np.zeros((8, 4)))
    assert result.first and result.balance is None and result.added == 8
    assert all(c.drift is None for c in result.classes)


def test_a_class_mix_shift_has_a_small_p_value_and_an_even_growth_does_not():
    champion = images({"a": 60, "b": 60, "c": 60})
    even = pd.concat([champion, images({"a": 10, "b": 10, "c": 10}, start=500)])
    skewed = pd.concat([champion, images({"a": 30}, start=500)])

    unchanged = changes.balance_shift(changes.class_counts(changes.image_sets(champion, even)))
    shifted = changes.balance_shift(changes.class_counts(changes.image_sets(champion, skewed)))

    assert unchanged.tvd == pytest.approx(0.0) and unchanged.p_value > 0.5
    # before 1/3 each; after a 90/210, b and c 60/210 each
    assert shifted.tvd == pytest.approx(90 / 210 - 1 / 3)
    assert shifted.p_value < 0.01
    assert (
        changes.balance_shift(changes.class_counts(changes.image_sets(champion, champion))).p_value
        is None
    )


def test_drifted_added_images_are_flagged_and_like_ones_are_not():
    dim = 128  # above PROJECTED_DIM: the projection is part of what is tested
    rng = np.random.default_rng(1)
    centres = {label: rng.standard_normal(dim) * 3 for label in ("a", "b")}
    champion = images({"a": 40, "b": 40})
    added = images({"a": 12, "b": 12}, start=100)
    current = pd.concat([champion, added], ignore_index=True)
    x = clustered(current, centres, seed=3)
    moved = (current["label"] == "b").to_numpy() & current["sha256"].str.endswith(
        tuple(f"{i:05d}" for i in range(100, 112))
    ).to_numpy()
    x[moved] += 1.5  # b's new images come from elsewhere

    result = changes.since_champion(champion, current, x)

    by = {c.label: c for c in result.classes}
    assert (by["a"].drift.added, by["a"].drift.kept) == (12, 40)
    assert by["a"].drift.p_value > 0.05 and not by["a"].drift.flagged
    assert by["b"].drift.p_value < 0.01 and by["b"].drift.flagged
    assert by["b"].drift.shift > 2 * by["a"].drift.shift
    assert result.flagged == ["b"] and result.expected_false_flags == pytest.approx(0.1)
    again = changes.since_champion(champion, current, x)
    assert again == result  # seeded: the same report twice


def test_drift_needs_both_groups_and_matching_features():
    with pytest.raises(ValueError, match="both groups"):
        changes.embedding_drift(np.zeros((3, 2)), np.array([False, False, False]))
    champion = images({"a": 5})
    current = pd.concat([champion, images({"a": 2}, start=10)])
    result = changes.since_champion(champion, current, np.zeros((3, 4)))
    assert "do not match" in result.drift_note and result.classes[0].drift is None


def test_drift_p_values_are_uniform_when_nothing_drifted():
    """Under the null a test at 0.05 flags about 5% of classes: not more (false alarms on
    every report), not none (a test that cannot fire)."""
    p_values = []
    for seed in range(100):
        x = np.random.default_rng(seed).standard_normal((40, 16))
        p_values.append(changes.embedding_drift(x, np.arange(40) < 10, 200, seed).p_value)
    p_values = np.array(p_values)
    assert 0.01 <= (p_values < 0.05).mean() <= 0.12
    assert 0.4 <= np.median(p_values) <= 0.6
