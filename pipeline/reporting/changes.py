"""What changed in the data since the champion (the production model): why a model changed.

Pure functions on tables and arrays. An image is its bytes and its label, ``(sha256,
label)``: a relabelled image is removed from one class and added to another. The
champion's images are the table promote keeps beside the production model (``sha256,
label, split``; empty before the first version); the current ones are the split tables,
with the features stage's embeddings in the same order.

Two tests, both by Monte Carlo permutation (seeded, so a report is reproducible, and
exact for small counts where a chi-square approximation is not):

- **class balance**: do the images that arrived and left have the class mix of those
  that stayed? The chi-square statistic of the (kept, added, removed) × class table,
  against random reassignments of the same images to the three groups;
- **embedding drift**, per class with added images: are the added images' embeddings
  drawn like the kept ones'? The distance between the two groups' mean embeddings,
  against random splits of the class's images into groups of the same sizes.
  Embeddings are first projected to ``PROJECTED_DIM`` dimensions by a fixed random
  matrix (the test stays exact, distances are kept approximately, and 100k images cost
  seconds).

p-values are per test, uncorrected: with 100 classes tested, about 5 fall under 0.05 by
chance alone when nothing drifted (``SinceChampion.expected_false_flags``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

PERMUTATIONS = 1000
SEED = 0
ALPHA = 0.05  # a drift p-value under this is flagged
PROJECTED_DIM = 64
CHUNK_VALUES = 4_000_000  # floats gathered at a time (32 MB): permutations × group × dims
KEY = ["sha256", "label"]


@dataclass(frozen=True)
class Drift:
    """The added images of one class against its kept ones, in embedding space.

    ``distance``: between the two groups' mean (projected) embeddings; ``shift``: that
    distance over the kept images' RMS distance to their own mean (0: same centre; 1: as
    far as a typical kept image is from it).
    """

    added: int
    kept: int
    distance: float
    shift: float
    p_value: float

    @property
    def flagged(self) -> bool:
        return self.p_value < ALPHA


@dataclass(frozen=True)
class ClassChange:
    """One class: images the champion had (``before``), has now (``after``), and the
    difference; ``drift`` where the class gained images and kept at least two."""

    label: str
    before: int
    after: int
    added: int
    removed: int
    share_before: float
    share_after: float
    drift: Drift | None = None


@dataclass(frozen=True)
class BalanceShift:
    """The class mix before and after: total variation distance between the proportions
    (0: same mix; 1: no class in common) and the permutation test's statistic and p-value
    (None when no image arrived or left)."""

    tvd: float
    statistic: float | None
    p_value: float | None


@dataclass(frozen=True)
class SinceChampion:
    """Everything the report shows under "Since the champion"."""

    first: bool  # no champion yet: every image is new
    before: int
    after: int
    added: int
    removed: int
    classes: list[ClassChange] = field(default_factory=list)
    balance: BalanceShift | None = None
    drift_note: str | None = None  # why drift was not tested, when it was not

    @property
    def drift_tested(self) -> int:
        return sum(c.drift is not None for c in self.classes)

    @property
    def flagged(self) -> list[str]:
        return [c.label for c in self.classes if c.drift is not None and c.drift.flagged]

    @property
    def expected_false_flags(self) -> float:
        return self.drift_tested * ALPHA


def image_sets(champion: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct (sha256, label) in either table, with ``before`` and ``after``
    (bool: the champion had it; it is here now)."""
    before = champion[KEY].drop_duplicates().assign(before=True)
    after = current[KEY].drop_duplicates().assign(after=True)
    both = before.merge(after, on=KEY, how="outer")
    return both.fillna({"before": False, "after": False}).astype({"before": bool, "after": bool})


def class_counts(images: pd.DataFrame) -> pd.DataFrame:
    """Per class (sorted): ``before``, ``after``, ``added``, ``removed``, ``kept`` counts of
    ``image_sets``' rows."""
    flags = pd.DataFrame(
        {
            "label": images["label"],
            "before": images["before"],
            "after": images["after"],
            "added": images["after"] & ~images["before"],
            "removed": images["before"] & ~images["after"],
            "kept": images["before"] & images["after"],
        }
    )
    return flags.groupby("label", sort=True).sum().astype(int)


def _chi_square(table: np.ndarray) -> np.ndarray:
    """Pearson's statistic of each (groups × classes) table in a stack (..., G, K)."""
    rows = table.sum(axis=-1, keepdims=True)
    cols = table.sum(axis=-2, keepdims=True)
    expected = rows * cols / table.sum(axis=(-2, -1), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        cells = np.where(expected > 0, (table - expected) ** 2 / expected, 0.0)
    return cells.sum(axis=(-2, -1))


def balance_shift(
    counts: pd.DataFrame, permutations: int = PERMUTATIONS, seed: int = SEED
) -> BalanceShift:
    """The class-mix change of ``class_counts``: TVD of the before and after proportions,
    and whether the added and removed images' classes differ from the kept images'."""
    before, after = counts["before"].to_numpy(float), counts["after"].to_numpy(float)
    tvd = (
        0.5 * float(np.abs(before / before.sum() - after / after.sum()).sum())
        if (before.sum() and after.sum())
        else 1.0
    )
    groups = counts[["kept", "added", "removed"]].to_numpy(np.int64).T  # (3, K)
    groups = groups[groups.sum(axis=1) > 0]
    if len(groups) < 2:
        return BalanceShift(tvd, None, None)
    observed = float(_chi_square(groups.astype(float)))
    pooled, sizes = groups.sum(axis=0), groups.sum(axis=1)
    rng = np.random.default_rng(seed)
    simulated = np.empty((permutations, *groups.shape))
    for b in range(permutations):
        left = pooled.copy()
        for g, size in enumerate(sizes[:-1]):
            simulated[b, g] = rng.multivariate_hypergeometric(left, size)
            left = left - simulated[b, g].astype(np.int64)
        simulated[b, -1] = left
    return BalanceShift(tvd, observed, _p_value(_chi_square(simulated), observed))


def _p_value(simulated: np.ndarray, observed: float) -> float:
    """The permutation p-value, counting the observed arrangement; ties within rounding
    count as at least as extreme, so the result does not hang on the last bit."""
    extreme = int((simulated >= observed - 1e-9 * max(abs(observed), 1.0)).sum())
    return (1 + extreme) / (1 + len(simulated))


def projection(dim: int, seed: int = SEED) -> np.ndarray | None:
    """The fixed (dim, PROJECTED_DIM) random Gaussian projection; None when ``dim`` is small."""
    if dim <= PROJECTED_DIM:
        return None
    rng = np.random.default_rng(seed)
    return rng.standard_normal((dim, PROJECTED_DIM)) / np.sqrt(PROJECTED_DIM)


def embedding_drift(
    embeddings: np.ndarray,
    added: np.ndarray,
    permutations: int = PERMUTATIONS,
    seed: int = SEED,
) -> Drift:
    """Two-sample permutation test on one class's (projected) ``embeddings``: rows where
    ``added`` is true against the rest, by the distance between the groups' means."""
    x = np.asarray(embeddings, dtype=np.float64)
    added = np.asarray(added, dtype=bool)
    n, n_added = len(x), int(added.sum())
    if not (0 < n_added < n):
        raise ValueError(f"need images in both groups: {n_added} added of {n}")
    total = x.sum(axis=0)
    # Random splits draw the smaller group; the other is the rest.
    small = added if n_added <= n - n_added else ~added
    m = int(small.sum())

    def distance(small_sums: np.ndarray) -> np.ndarray:
        return np.linalg.norm(small_sums / m - (total - small_sums) / (n - m), axis=-1)

    observed = float(distance(x[small].sum(axis=0)))
    rng = np.random.default_rng(seed)
    simulated = []
    chunk = max(1, CHUNK_VALUES // (m * x.shape[1]))
    for start in range(0, permutations, chunk):
        b = min(chunk, permutations - start)
        picks = np.argsort(rng.random((b, n)), axis=1)[:, :m]
        simulated.append(distance(x[picks].sum(axis=1)))
    kept = x[~added]
    spread = float(np.sqrt(((kept - kept.mean(axis=0)) ** 2).sum(axis=1).mean()))
    return Drift(
        added=n_added,
        kept=n - n_added,
        distance=observed,
        shift=observed / spread if spread > 0 else float("inf"),
        p_value=_p_value(np.concatenate(simulated), observed),
    )


def since_champion(
    champion: pd.DataFrame,
    current: pd.DataFrame,
    embeddings: np.ndarray | None,
    permutations: int = PERMUTATIONS,
    seed: int = SEED,
) -> SinceChampion:
    """What changed from the ``champion``'s images to the ``current`` ones (``sha256,
    label`` each), with the drift of each class's added images where ``embeddings`` (one
    row per ``current`` row, or None) are given."""
    images = image_sets(champion, current)
    counts = class_counts(images)
    before_total, after_total = int(counts["before"].sum()), int(counts["after"].sum())
    first = before_total == 0
    drifts: dict[str, Drift] = {}
    note = None
    if first:
        note = "no champion yet: every image is new"
    elif embeddings is None:
        note = "no features for the current images (run the features stage)"
    elif len(embeddings) != len(current):
        note = (
            f"the features ({len(embeddings)} rows) do not match the split tables "
            f"({len(current)} rows): run the features stage"
        )
    else:
        p = projection(embeddings.shape[1], seed)
        projected = embeddings if p is None else np.asarray(embeddings, np.float64) @ p
        had = set(map(tuple, champion[KEY].drop_duplicates().itertuples(index=False)))
        pairs = zip(current["sha256"], current["label"], strict=True)
        is_added = np.array([pair not in had for pair in pairs], dtype=bool)
        # one row per distinct image: a copy must not count twice
        distinct = ~current.duplicated(KEY).to_numpy()
        labels = current["label"].to_numpy()
        for label in counts.index:
            in_class = distinct & (labels == label)
            n_added = int((is_added & in_class).sum())
            if n_added and int(in_class.sum()) - n_added >= 2:
                drifts[label] = embedding_drift(
                    projected[in_class], is_added[in_class], permutations, seed
                )
    shares_before = counts["before"] / before_total if before_total else counts["before"] * 0.0
    shares_after = counts["after"] / after_total if after_total else counts["after"] * 0.0
    classes = [
        ClassChange(
            label=str(label),
            before=int(row.before),
            after=int(row.after),
            added=int(row.added),
            removed=int(row.removed),
            share_before=float(shares_before[label]),
            share_after=float(shares_after[label]),
            drift=drifts.get(label),
        )
        for label, row in counts.iterrows()
    ]
    return SinceChampion(
        first=first,
        before=before_total,
        after=after_total,
        added=int(counts["added"].sum()),
        removed=int(counts["removed"].sum()),
        classes=classes,
        balance=None if first else balance_shift(counts, permutations, seed),
        drift_note=note,
    )
