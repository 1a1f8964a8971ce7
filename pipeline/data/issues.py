"""What may be wrong in the user's own data, found from the cached embeddings: likely label
errors, outliers, near-duplicates with different labels, and class pairs the data confuses.

Every image is scored by a linear probe that never saw its label, nor a copy of it: K
probes, each trained on the other folds (out-of-fold probabilities), with copies of an
image (one sha256) kept in one fold. A label error is an image whose given label gets a low
probability; how many to report is estimated by confident learning (Northcutt et al. 2021:
the confident joint's off-diagonal), and they are reported lowest self-confidence first, as
cleanlab's ``low_self_confidence`` filter does. Outliers are far from every image in
embedding space; near-duplicates are close to an image of another label.

The probe is fitted in float64, and scores and similarities are rounded to 4 decimals
before anything is ranked or compared, with ties broken by row, so what is reported does
not follow the CPU's vector instructions or the BLAS kernels chosen for them (checked on
Caltech-101: BENCHMARKS.md). Nothing here drops or relabels an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# What each kind of issue is called where a person reads it (the report).
ISSUES = {
    "label_error": "likely label error",
    "near_duplicate": "near-duplicate",
    "outlier": "outlier",
}
DECIMALS = 4  # of every score and similarity, written and compared
# Principal axes the probe sees (Caltech-101 with 2% flips: 128 find 0.971 of them, 256 0.978).
PROBE_DIMS = 256
PROBE_L2 = 1e-3  # weight decay on the probe's weights, on unit-variance axes
# L-BFGS-B's default stop, in float64: Caltech-101's findings were identical on OpenBLAS's
# Haswell kernels with numpy's AVX-512 off and on this Zen 4's own (a float32 loss was not;
# a 1e-9 gradient stop cost 1.8x for nothing more).
PROBE_OPTIONS = {"maxiter": 1000}
# Rows of the cosine-similarity matrix computed at once: 8 kB per image in each block.
SIMILARITY_BLOCK = 2048


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (float64): cosine similarity is then a dot product."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def principal_axes(unit: np.ndarray, dims: int = PROBE_DIMS) -> np.ndarray:
    """``unit`` standardised and projected on its ``dims`` leading principal axes, scaled so
    the first has unit variance: the probe then fits in seconds with one weight decay."""
    z = unit - unit.mean(axis=0)
    z /= z.std(axis=0) + 1e-12
    values, vectors = np.linalg.eigh(z.T @ z / len(z))
    order = np.argsort(values)[::-1][: min(dims, z.shape[1])]
    projected = z @ vectors[:, order]
    return projected / (projected[:, 0].std() or 1.0)


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, 0..folds-1. A group (copies of one image) stays in one fold, or a
    probe would learn a copy's label and score the other by it; each class's groups are
    dealt round the folds in a seeded order, each class starting where the last stopped,
    so the folds differ by about one image."""
    rng = np.random.default_rng(seed)
    _, first = np.unique(groups, return_index=True)  # each group's first row
    group_label = y[first]
    fold_of_group = np.empty(len(first), dtype=np.int64)
    dealt = 0
    for label in np.unique(group_label):
        members = np.flatnonzero(group_label == label)
        rng.shuffle(members)
        fold_of_group[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold_of_group[np.unique(groups, return_inverse=True)[1]]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = PROBE_L2) -> np.ndarray:
    """Multinomial logistic regression by L-BFGS from zero: weights (features + 1, classes),
    the last row the bias (not decayed). scipy is imported here: the report reads this
    module's names and no more."""
    from scipy.optimize import minimize

    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    xbt = np.ascontiguousarray(xb.T)
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), y] = 1.0
    decay = np.ones((d + 1, 1))
    decay[-1] = 0.0

    def loss_and_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(d + 1, n_classes)
        logits = xb @ w
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        total = probs.sum(axis=1, keepdims=True)
        nll = (np.log(total[:, 0]) - (logits * onehot).sum(axis=1)).mean()
        probs /= total
        probs -= onehot
        grad = xbt @ probs / n + 2 * l2 * w * decay
        return float(nll + l2 * ((w * decay) ** 2).sum()), grad.ravel()

    result = minimize(
        loss_and_grad,
        np.zeros((d + 1) * n_classes),
        jac=True,
        method="L-BFGS-B",
        options=PROBE_OPTIONS,
    )
    return result.x.reshape(d + 1, n_classes)


@dataclass(frozen=True)
class OutOfFold:
    """Each image's class probabilities from the probe that did not see it, and whether it
    can be judged: its class had two or more images in that probe's training folds."""

    probs: np.ndarray
    judged: np.ndarray


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, folds: int, seed: int
) -> OutOfFold:
    """Each image's class probabilities from the probe trained on the other folds (copies,
    the same ``groups`` value, in one fold)."""
    fold = grouped_folds(y, groups, folds, seed)
    probs = np.full((len(y), n_classes), 1.0 / n_classes)
    judged = np.zeros(len(y), dtype=bool)
    for k in range(folds):
        held = fold == k
        if not held.any() or held.all():
            continue
        seen = np.bincount(y[~held], minlength=n_classes)
        w = fit_probe(x[~held], y[~held], n_classes)
        probs[held] = softmax(x[held] @ w[:-1] + w[-1])
        judged[held] = seen[y[held]] >= 2
    return OutOfFold(probs, judged)


@dataclass(frozen=True)
class LabelIssues:
    """Likely label errors: image indices, lowest self-confidence first, with their scores
    (1 - the probability of the given label) and suggested classes."""

    rows: np.ndarray
    score: np.ndarray
    suggested: np.ndarray


def estimated_label_errors(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which images confident learning counts as mislabelled (cleanlab's default count): a
    class is confident for an image when its probability reaches that class's mean
    self-confidence, the likeliest of those wins, and an image counts when that class and
    its likeliest class are both not its label. (Calibrating the confident joint counted
    232 for Caltech-101's 141 flips, recall 0.99 but precision 0.60.)"""
    n_classes = probs.shape[1]
    thresholds = np.full(n_classes, np.inf)
    for label in np.unique(y):
        thresholds[label] = probs[y == label, label].mean() - 1e-6
    above = probs >= thresholds
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    return above.any(axis=1) & (confident != y) & (probs.argmax(axis=1) != y)


def label_issues(oof: OutOfFold, y: np.ndarray) -> LabelIssues:
    """As many judged images as confident learning estimates are mislabelled, taken lowest
    self-confidence first (ties: by row); each one's suggestion is its likeliest other class."""
    rows = np.flatnonzero(oof.judged)
    probs, labels = oof.probs[rows], y[rows]
    self_confidence = np.round(probs[np.arange(len(rows)), labels], DECIMALS)
    count = int(estimated_label_errors(probs, labels).sum())
    order = np.lexsort((rows, self_confidence))[:count]
    others = probs[order].copy()
    others[np.arange(len(order)), labels[order]] = -1.0
    return LabelIssues(rows[order], 1.0 - self_confidence[order], others.argmax(axis=1))


@dataclass(frozen=True)
class Neighbourhood:
    """Each image's ``k`` most similar other images (indices, cosine similarities rounded to
    ``DECIMALS``, most similar first, ties by index), and the pairs (i, j, similarity), i < j,
    of images with different labels at least ``threshold`` similar, most similar first."""

    index: np.ndarray
    similarity: np.ndarray
    near_duplicates: list[tuple[int, int, float]]


def neighbourhood(unit: np.ndarray, y: np.ndarray, k: int, threshold: float) -> Neighbourhood:
    """One pass over the cosine-similarity matrix, a block of rows at a time: the nearest
    neighbours, and every pair at or above ``threshold`` with different labels (all of
    them, however many copies an image has)."""
    n = len(unit)
    k = max(min(k, n - 1), 0)
    unit = unit.astype(np.float32)  # 2x faster; what is compared is rounded to 4 decimals
    scale = 10**DECIMALS
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.zeros((n, k))
    pairs: list[tuple[int, int, float]] = []
    # one rank per cell, lower for more similar and then for a lower index: no ties
    # (int32 while it fits: half the memory traffic of int64)
    kind = np.int32 if (2 * scale + 1) * n < np.iinfo(np.int32).max else np.int64
    columns = np.arange(n, dtype=kind)
    for start in range(0, n, SIMILARITY_BLOCK):
        stop = min(start + SIMILARITY_BLOCK, n)
        rounded = np.rint(unit[start:stop] @ unit.T * scale).astype(kind)
        rows = np.arange(stop - start)
        rank = (scale - rounded) * kind(n) + columns
        rank[rows, rows + start] = np.iinfo(kind).max  # not itself
        if k:
            if k < n - 1:
                part = np.argpartition(rank, k - 1, axis=1)[:, :k]
            else:
                part = np.argsort(rank, axis=1)[:, :k]
            part = np.take_along_axis(part, np.argsort(np.take_along_axis(rank, part, 1), 1), 1)
            index[start:stop] = part
            similarity[start:stop] = np.take_along_axis(rounded, part, axis=1) / scale
        i, j = np.nonzero(rounded >= round(threshold * scale))
        i += start
        keep = (i < j) & (y[i] != y[j])
        pairs += [
            (int(a), int(b), int(s) / scale)
            for a, b, s in zip(i[keep], j[keep], rounded[i[keep] - start, j[keep]], strict=True)
        ]
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return Neighbourhood(index, similarity, pairs)


def outliers(similarity: np.ndarray, fence: float) -> tuple[np.ndarray, np.ndarray]:
    """Images whose mean cosine distance to their nearest neighbours lies beyond the upper
    Tukey fence (Q3 + ``fence`` × IQR) of that distance over the dataset: (indices, distances),
    farthest first."""
    if similarity.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    distance = np.round(1.0 - similarity.mean(axis=1), DECIMALS)
    q1, q3 = np.percentile(distance, [25, 75])
    far = np.flatnonzero(distance > q3 + fence * (q3 - q1))
    far = far[np.lexsort((far, -distance[far]))]
    return far, distance[far]


def confused_classes(
    probs: np.ndarray, y: np.ndarray, top: int
) -> list[tuple[int, int, int, float]]:
    """Class pairs (a, b, images, share) the data itself confuses: images of either class
    that the out-of-fold probe gives to the other, as a share of the two classes' images,
    most first (pairs with one such image or none are left out)."""
    n_classes = probs.shape[1]
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (y, probs.argmax(axis=1)), 1)
    sizes = np.bincount(y, minlength=n_classes)
    both = counts + counts.T
    a, b = np.nonzero(np.triu(both >= 2, 1))
    pairs = [
        (
            int(i),
            int(j),
            int(both[i, j]),
            round(float(both[i, j] / (sizes[i] + sizes[j])), DECIMALS),
        )
        for i, j in zip(a, b, strict=True)
    ]
    pairs.sort(key=lambda p: (-p[3], -p[2], p[0], p[1]))
    return pairs[:top]
