"""From a few attention labels to a score for every image (ALGORITHMS.md item 6), as the
reference code computes it (xiweix/SLIM, ``utils/analysis.py::propagate_core_spurious`` and
the sampling notebook):

* per class, the class's 2-D embedding E standardised with ONE mean and ONE standard
  deviation over all its coordinates (not per axis);
* scikit-learn's LabelSpreading on it (rbf kernel, the class's own gamma: the notebook's 10
  for class 0 and 5 for class 1, alpha 1e-6 so the answers stay as given, max_iter 1e5);
  unsure answers (-1) count as unlabelled;
* the score is P(label 1) ("attention on the core object"), min-max scaled within the class;
* where a class's answers lack a 0 or a 1 (all one answer, or none), every score of the class
  is 1: no contrast to spread, nothing dropped;
* the instances scored above the median of *all* scores (both classes together:
  ``keep_scope: global``, the notebook's ``score > np.median(score)``) are kept;
  ``keep_quantile`` moves the cut, ``keep_scope: per_class`` cuts each class at its own.

Where this departs from the reference (docs/methods.md): images with no kernel connection to
any labelled image get P = 0.5 (scikit-learn would divide by zero); classes above
``max_dense`` images (CelebA) use the k-nearest-neighbour kernel (a dense rbf kernel needs
n^2 memory; the reference fits on 50,000 sampled unlabelled images instead). Keeping is
strict (score > the quantile), but when that would keep nothing (every score 1) the
instances *at* the quantile are kept too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Propagation", "class_gammas", "keep_above_quantile", "propagate",
           "scalar_standardise"]

MAX_DENSE = 20_000
KNN_NEIGHBOURS = 10


@dataclass(frozen=True)
class Propagation:
    """Scores in [0, 1] and the keep mask, both aligned with the training positions."""

    scores: np.ndarray
    keep: np.ndarray
    notes: dict[int, str] = field(default_factory=dict)


def class_gammas(gamma: float | Sequence[float], n_classes: int) -> list[float]:
    """One gamma per class, from a single float or a per-class list."""
    values = [float(gamma)] * n_classes if isinstance(gamma, int | float) else [
        float(g) for g in gamma]
    if len(values) == 1:  # one value for every class
        values = values * n_classes
    if len(values) < n_classes or any(g <= 0 for g in values):
        raise ValueError(f"gamma must be a positive number or one per class ({n_classes}), "
                         f"got {gamma!r}")
    return values[:n_classes]


def keep_above_quantile(scores: np.ndarray, quantile: float) -> np.ndarray:
    """Mask of scores strictly above the quantile; those at it too if that keeps nothing."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"keep_quantile must be in [0, 1), got {quantile!r}")
    if len(scores) == 0:
        return np.zeros(0, dtype=bool)
    threshold = np.quantile(scores, quantile)
    keep = scores > threshold
    return keep if keep.any() else scores >= threshold


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def scalar_standardise(x: np.ndarray) -> np.ndarray:
    """``(x - x.mean()) / x.std()`` over every coordinate at once, as the reference
    standardises a class's embedding (one scale for both axes keeps its shape)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def _class_scores(points: np.ndarray, targets: np.ndarray, gamma: float, alpha: float,
                  max_dense: int) -> tuple[np.ndarray, str]:
    """Min-max scaled P(label 1) for one class's standardised points; targets are 1/0/-1
    (unlabelled)."""
    labelled = np.flatnonzero(targets >= 0)
    present = set(targets[labelled].tolist())
    if present != {0, 1}:
        what = f"all answers are {present.pop()}" if present else "no usable answer"
        return np.ones(len(points)), f"{what}: every score 1 (the reference's rule)"
    from sklearn.semi_supervised import LabelSpreading  # where it runs: see linear_heads.py

    if len(points) > max_dense:
        model = LabelSpreading(kernel="knn", n_neighbors=KNN_NEIGHBOURS, alpha=alpha,
                               max_iter=100_000)
        note = f"{len(points)} images > {max_dense}: knn kernel instead of rbf"
    else:
        model = LabelSpreading(kernel="rbf", gamma=gamma, alpha=alpha, max_iter=100_000)
        note = "label spreading"
    model.fit(points, targets)
    # The reference scores with predict_proba on the fitted points (one more propagation
    # step through the kernel than label_distributions_, rows renormalised).
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = model.predict_proba(points)
    prob = dist[:, list(model.classes_).index(1)]
    disconnected = ~np.isfinite(dist).all(axis=1) | (np.nan_to_num(dist).sum(axis=1) <= 0)
    return _minmax(np.where(disconnected, 0.5, np.nan_to_num(prob))), note


def propagate(embedding: np.ndarray, y: np.ndarray, annotated_positions: np.ndarray,
              labels: np.ndarray, gamma: float | Sequence[float], alpha: float = 1e-6,
              keep_quantile: float = 0.5, max_dense: int = MAX_DENSE,
              keep_scope: str = "global") -> Propagation:
    """Spread the annotations over each class and keep the best-scoring instances (above the
    ``keep_quantile`` of all scores, or of each class's with ``keep_scope="per_class"``).

    ``embedding`` (N, 2) and ``y`` are aligned with the pool's positions; ``labels`` holds the
    answer (1, 0 or -1) for each of ``annotated_positions``.
    """
    if keep_scope not in ("global", "per_class"):
        raise ValueError(f"keep_scope must be 'global' or 'per_class', got {keep_scope!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    embedding = np.asarray(embedding, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    annotated_positions = np.asarray(annotated_positions, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(annotated_positions) != len(labels):
        raise ValueError("annotated_positions and labels differ in length")
    if not np.isin(labels, (1, 0, -1)).all():
        raise ValueError(f"labels must be 1, 0 or -1, got {sorted(set(labels.tolist()))}")
    n_classes = int(y.max()) + 1 if len(y) else 0
    gammas = class_gammas(gamma, n_classes)
    targets = np.full(len(y), -1, dtype=np.int64)
    targets[annotated_positions] = labels
    scores = np.zeros(len(y))
    keep = np.zeros(len(y), dtype=bool)
    notes: dict[int, str] = {}
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        if len(rows) == 0:
            continue
        scores[rows], notes[c] = _class_scores(scalar_standardise(embedding[rows]),
                                               targets[rows], gammas[c], alpha, max_dense)
        if keep_scope == "per_class":
            keep[rows] = keep_above_quantile(scores[rows], keep_quantile)
    if keep_scope == "global":
        keep = keep_above_quantile(scores, keep_quantile)
    return Propagation(scores=scores, keep=keep, notes=notes)
