"""Bounds on a test split that sampling noise cannot fail: one-sided tests, not raw rates.

onnx_check compares two classifiers image by image on the same test split (ONNX against
PyTorch, int8 against fp32). On 80 test images one flipped prediction is 1.25 pt, so a
bound of "at most 1 pt lost" read off the raw figure fails a sound model on small data,
while on 10,000 images the same raw reading is tight. Each bound is therefore a null
hypothesis about the *true* rate (on images like these), and a check fails only when the
test split is evidence against it at significance ``alpha``:

- the candidate loses at most ``max_drop`` top-1 accuracy: the non-inferiority score test
  for paired proportions (Tango 1998, Statistics in Medicine 17:891), one-sided, on the
  images the two models disagree about;
- the two models disagree on at most a fraction ``max_rate`` of images: an exact
  binomial test on the disagreements;
- the candidate is no worse than the reference at all (promote's challenger against the
  champion): the exact one-sided McNemar test on the images only one gets right.

Both use only the standard library (they run where only onnxruntime is installed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (log-space sum of the lower tail)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    # The smaller tail is summed for accuracy: below the mean, sum P(X < k) and subtract.
    if k > n * p:
        terms = (
            lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
            for i in range(k, n + 1)
        )
        return min(1.0, math.fsum(math.exp(t) for t in terms))
    terms = (
        lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(0, k)
    )
    return max(0.0, 1.0 - math.fsum(math.exp(t) for t in terms))


@dataclass(frozen=True)
class PairedOutcome:
    """Two classifiers scored on the same ``images``: how many each got right alone."""

    images: int
    lost: int  # the reference right, the candidate wrong
    gained: int  # the candidate right, the reference wrong

    @property
    def drop(self) -> float:
        """Top-1 accuracy the candidate loses against the reference on these images."""
        return (self.lost - self.gained) / self.images if self.images else 0.0

    def p_value(self, max_drop: float) -> float:
        """How likely a drop at least this large is if the true drop were ``max_drop``.

        Tango's score statistic for H0: drop <= max_drop against drop > max_drop, with
        the probabilities of the two kinds of disagreement estimated under H0.
        """
        n, b, c, delta = self.images, self.lost, self.gained, max_drop
        if n == 0:
            return 1.0
        # Restricted maximum-likelihood estimate of P(candidate right, reference wrong)
        # given lost - gained = delta (Tango's quadratic).
        a_coef = 2 * n
        b_coef = -b - c + (2 * n - b + c) * delta
        c_coef = -c * delta * (1 - delta)
        root = math.sqrt(max(0.0, b_coef * b_coef - 4 * a_coef * c_coef))
        p_gained = (-b_coef + root) / (2 * a_coef)
        variance = n * (2 * p_gained + delta * (1 - delta))
        excess = b - c - n * delta
        if variance <= 0:
            return 0.0 if excess > 0 else 1.0
        return normal_sf(excess / math.sqrt(variance))

    def worse_p_value(self) -> float:
        """How likely this many losses or more among the images the two disagree on are if
        neither were better: the exact one-sided McNemar test (a binomial at 1/2 on the
        discordant pairs), for a candidate that must not be worse at all (promote)."""
        return binomial_sf(self.lost, self.lost + self.gained, 0.5)

    def exceeds(self, max_drop: float, alpha: float) -> bool:
        """Whether these images are evidence (at ``alpha``) of a true drop above ``max_drop``."""
        return self.drop > max_drop and self.p_value(max_drop) < alpha


def paired_outcome(reference_right, candidate_right) -> PairedOutcome:
    """Count the images only one of the two classifiers labels correctly (bool sequences)."""
    pairs = list(zip(reference_right, candidate_right, strict=True))
    return PairedOutcome(
        images=len(pairs),
        lost=sum(1 for r, c in pairs if r and not c),
        gained=sum(1 for r, c in pairs if c and not r),
    )


def rate_p_value(count: int, images: int, max_rate: float) -> float:
    """How likely ``count`` or more events in ``images`` are if their true rate were ``max_rate``."""
    return binomial_sf(count, images, max_rate)


def rate_exceeds(count: int, images: int, max_rate: float, alpha: float) -> bool:
    """Whether ``count`` events in ``images`` are evidence of a true rate above ``max_rate``."""
    return (
        images > 0 and count > max_rate * images and rate_p_value(count, images, max_rate) < alpha
    )
