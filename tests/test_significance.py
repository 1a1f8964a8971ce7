"""The one-sided tests behind onnx_check's bounds: exact values, size and power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.reporting.significance import (
    PairedOutcome,
    binomial_sf,
    normal_sf,
    paired_outcome,
    rate_exceeds,
    rate_p_value,
)


@pytest.mark.parametrize(
    ("k", "n", "p"), [(8, 10, 0.5), (0, 5, 0.3), (1, 80, 0.001), (5, 1736, 0.001), (60, 100, 0.4)]
)
def test_binomial_tail_is_exact(k, n, p):
    assert binomial_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-15)


def test_binomial_tail_edges():
    assert binomial_sf(8, 10, 0.5) == pytest.approx(56 / 1024)
    assert binomial_sf(11, 10, 0.5) == 0.0 and binomial_sf(0, 10, 0.5) == 1.0
    assert binomial_sf(1, 10, 0.0) == 0.0 and binomial_sf(3, 10, 1.0) == 1.0
    assert normal_sf(0.0) == pytest.approx(0.5) and normal_sf(1.6449) == pytest.approx(
        0.05, abs=1e-4
    )


def test_one_flipped_image_on_a_small_split_is_not_a_drop():
    # issue #16: 80 test images, fp32 95.0%, int8 93.75%: one image lost
    small = PairedOutcome(images=80, lost=1, gained=0)
    assert small.drop == pytest.approx(0.0125)
    assert not small.exceeds(0.01, 0.05) and small.p_value(0.01) > 0.3
    # Five net images lost of 80 (6.25 pt) is evidence.
    assert PairedOutcome(80, 5, 0).exceeds(0.01, 0.05)


def test_saturated_int8_fails_and_a_sound_one_passes():
    # issue #16 on the AVX2 machine: digits int8 lost 47 and gained 2 of 359 test images.
    saturated = PairedOutcome(images=359, lost=47, gained=2)
    assert saturated.exceeds(0.01, 0.05) and saturated.p_value(0.01) < 1e-6
    # The stop-14 VNNI run on Caltech-101: -0.34 pt (a few more lost than gained).
    assert not PairedOutcome(1736, 12, 6).exceeds(0.01, 0.05)
    # A 3-pt regression on Caltech-101's 1,736 test images is caught.
    assert PairedOutcome(1736, 62, 10).exceeds(0.01, 0.05)
    # Better than the reference is never a drop.
    assert not PairedOutcome(1736, 2, 30).exceeds(0.01, 0.05)
    assert (
        PairedOutcome(0, 0, 0).p_value(0.01) == 1.0 and PairedOutcome(100, 0, 0).p_value(0.0) == 1.0
    )


def test_paired_test_keeps_its_size_at_the_bound_and_has_power_beyond_it():
    """Simulated test splits: at a true drop of exactly the bound, the test rejects about
    ``alpha`` of the time (not much more); at three times the bound, nearly always."""
    rng = np.random.default_rng(0)

    def rejection_rate(n: int, p_lost: float, p_gained: float, trials: int = 4000) -> float:
        counts = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained], size=trials)
        return float(
            np.mean([PairedOutcome(n, int(b), int(c)).exceeds(0.01, 0.05) for b, c, _ in counts])
        )

    assert rejection_rate(500, 0.025, 0.015) <= 0.07
    assert rejection_rate(2000, 0.02, 0.01) <= 0.07
    assert rejection_rate(2000, 0.035, 0.005) >= 0.99


def test_paired_outcome_counts_only_the_images_one_model_gets_right():
    reference = [True, True, False, False, True]
    candidate = [True, False, True, False, False]
    assert paired_outcome(reference, candidate) == PairedOutcome(images=5, lost=2, gained=1)
    with pytest.raises(ValueError):
        paired_outcome([True], [True, False])


def test_rate_bound_allows_a_stray_disagreement_on_small_splits():
    # min_top1_agreement 0.999: one disagreement in 80 is within noise, two are not.
    assert not rate_exceeds(1, 80, 0.001, 0.05)
    assert rate_exceeds(2, 80, 0.001, 0.05)
    assert rate_p_value(2, 80, 0.001) == pytest.approx(
        1 - 0.999**80 - 80 * 0.001 * 0.999**79, rel=1e-9
    )
    assert not rate_exceeds(0, 0, 0.001, 0.05)
    # Caltech-101's 1,736 images: 1.7 expected at the bound; 6 is evidence of more.
    assert not rate_exceeds(3, 1736, 0.001, 0.05) and rate_exceeds(6, 1736, 0.001, 0.05)
    assert math.isclose(rate_p_value(0, 10, 0.5), 1.0)
