"""What may be wrong in the user's own data, found from the cached embeddings: likely label
errors, outliers, near-duplicates with different labels, and class pairs the data confuses.

Every image is scored by a linear probe that never saw its label: K probes, each trained on
the other folds (out-of-fold probabilities). A label error is an image whose given label
gets a low probability; how many to report is estimated by confident learning (Northcutt et
al. 2021: the confident joint's off-diagonal), and they are reported lowest
self-confidence first, as cleanlab's ``low_self_confidence`` filter does. Outliers are far
from every image in embedding space; near-duplicates are close to an image of another label.

Seeds are fixed and scores are rounded to 4 decimals when written, so the advice does not
depend on the CPU's vector instructions. Nothing here drops or relabels an image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

PROBE_DIMS = (
    256  # principal axes the probe sees (Caltech-101: 128 finds 0.971 of 2% flips, 256 0.978)
)
PROBE_L2 = 1e-3  # weight decay on the probe's weights, on unit-variance axes
PROBE_ITERATIONS = 200  # L-BFGS steps at most per fold
SIMILARITY_BLOCK = (
    2048  # rows of the cosine-similarity matrix computed at once (16 MB per 1,000 images)
)


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
    vectors = vectors[:, order]
    # eigh's signs are arbitrary; fix them so the projection is the same on every machine
    vectors *= np.where(vectors[np.abs(vectors).argmax(axis=0), range(len(order))] < 0, -1.0, 1.0)
    projected = z @ vectors
    return projected / (projected[:, 0].std() or 1.0)


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, 0..folds-1: every class dealt round the folds in a seeded order,
    each class starting where the last one stopped, so the folds differ by one image at most."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    dealt = 0
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        fold[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = PROBE_L2) -> np.ndarray:
    """Multinomial logistic regression by L-BFGS from zero: weights (features + 1, classes),
    the last row the bias (not decayed). The loss and gradient are computed in float32 (1.3x
    faster on Caltech-101, the same issues found); the optimiser's state is float64."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))]).astype(np.float32)
    xbt = np.ascontiguousarray(xb.T)
    onehot = np.zeros((n, n_classes), dtype=np.float32)
    onehot[np.arange(n), y] = 1.0
    decay = np.ones((d + 1, 1))
    decay[-1] = 0.0

    def loss_and_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(d + 1, n_classes)
        logits = xb @ w.astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        total = probs.sum(axis=1, keepdims=True)
        nll = (np.log(total[:, 0]) - (logits * onehot).sum(axis=1)).mean(dtype=np.float64)
        probs /= total
        probs -= onehot
        grad = (xbt @ probs).astype(np.float64) / n + 2 * l2 * w * decay
        return float(nll + l2 * ((w * decay) ** 2).sum()), grad.ravel()

    result = minimize(
        loss_and_grad,
        np.zeros((d + 1) * n_classes),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": PROBE_ITERATIONS},
    )
    return result.x.reshape(d + 1, n_classes)


def out_of_fold_probabilities(
    x: np.ndarray, y: np.ndarray, n_classes: int, folds: int, seed: int
) -> np.ndarray:
    """Each image's class probabilities from the probe trained on the other folds."""
    fold = stratified_folds(y, folds, seed)
    probs = np.zeros((len(y), n_classes))
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        w = fit_probe(x[~held], y[~held], n_classes)
        probs[held] = softmax(x[held] @ w[:-1] + w[-1])
    return probs


@dataclass(frozen=True)
class LabelIssues:
    """Likely label errors: image indices, lowest self-confidence first, with their scores
    (1 - the probability of the given label) and suggested classes."""

    rows: np.ndarray
    score: np.ndarray
    suggested: np.ndarray


def estimated_label_errors(probs: np.ndarray, y: np.ndarray) -> int:
    """How many images are mislabelled, by confident learning: a class is confident for an
    image when its probability reaches that class's mean self-confidence, and the likeliest
    of those wins; the images whose confident class is not their label (the confident
    joint's off-diagonal) are the estimate, cleanlab's default. Its calibrated variant
    counted 232 for Caltech-101's 141 flips (recall 0.99, precision 0.60), this one 138."""
    n_classes = probs.shape[1]
    thresholds = np.full(n_classes, np.inf)
    for label in np.unique(y):
        thresholds[label] = probs[y == label, label].mean()
    above = probs >= thresholds
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    return int((above.any(axis=1) & (confident != y)).sum())


def label_issues(probs: np.ndarray, y: np.ndarray) -> LabelIssues:
    """As many images as confident learning estimates are mislabelled, taken lowest
    self-confidence first (cleanlab's ``low_self_confidence`` filter); each one's suggestion
    is its likeliest other class."""
    rows = np.arange(len(y))
    self_confidence = probs[rows, y]
    order = np.lexsort((rows, self_confidence))[
        : estimated_label_errors(probs, y)
    ]  # ties: file order
    others = probs.copy()
    others[rows, y] = -1.0
    return LabelIssues(order, 1.0 - self_confidence[order], others[order].argmax(axis=1))


def nearest_neighbours(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ``k`` most similar other images (indices, cosine similarities, most
    similar first), a block of rows at a time."""
    n = len(unit)
    k = min(k, n - 1)
    unit = unit.astype(np.float32)  # 2x faster; similarities are written to 4 decimals
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.zeros((n, k))
    for start in range(0, n, SIMILARITY_BLOCK):
        stop = min(start + SIMILARITY_BLOCK, n)
        block = unit[start:stop] @ unit.T
        block[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not itself
        if k < n - 1:
            part = np.argpartition(-block, k - 1, axis=1)[:, :k]
        else:  # every other image
            part = np.argsort(-block, axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(block, part, axis=1)
        order = np.lexsort((part, -values), axis=1)
        index[start:stop] = np.take_along_axis(part, order, axis=1)
        similarity[start:stop] = np.take_along_axis(values, order, axis=1)
    return index, similarity


def outliers(similarity: np.ndarray, fence: float) -> tuple[np.ndarray, np.ndarray]:
    """Images whose mean cosine distance to their nearest neighbours lies beyond the upper
    Tukey fence (Q3 + ``fence`` × IQR) of that distance over the dataset: (indices, distances),
    farthest first."""
    distance = 1.0 - similarity.mean(axis=1)
    q1, q3 = np.percentile(distance, [25, 75])
    far = np.flatnonzero(distance > q3 + fence * (q3 - q1))
    far = far[np.lexsort((far, -distance[far]))]
    return far, distance[far]


def near_duplicates(
    index: np.ndarray, similarity: np.ndarray, y: np.ndarray, threshold: float
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity), i < j, of images with different labels at least
    ``threshold`` similar, most similar first: the same picture filed under two classes."""
    found: dict[tuple[int, int], float] = {}
    rows, cols = np.nonzero(similarity >= threshold)
    for i, j, s in zip(rows, index[rows, cols], similarity[rows, cols], strict=True):
        if y[i] != y[j]:
            found[(min(int(i), int(j)), max(int(i), int(j)))] = float(s)
    return sorted(((i, j, s) for (i, j), s in found.items()), key=lambda p: (-p[2], p[0], p[1]))


def confused_classes(
    probs: np.ndarray, y: np.ndarray, top: int
) -> list[tuple[int, int, int, float]]:
    """Class pairs (a, b, images, share) the data itself confuses: images of either class
    that the out-of-fold probe gives to the other, as a share of the two classes' images,
    most first (pairs with one such image or none are left out)."""
    n_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (y, predicted), 1)
    sizes = np.bincount(y, minlength=n_classes)
    pairs = []
    for a in range(n_classes):
        for b in range(a + 1, n_classes):
            both = int(counts[a, b] + counts[b, a])
            if both >= 2:
                pairs.append((a, b, both, both / int(sizes[a] + sizes[b])))
    pairs.sort(key=lambda p: (-p[3], -p[2], p[0], p[1]))
    return pairs[:top]
