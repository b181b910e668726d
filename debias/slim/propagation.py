"""From a few attention labels to a score for every training image (ALGORITHMS.md item 6).

Per class, scikit-learn's LabelSpreading (rbf kernel, a per-class gamma, small alpha so the
given labels stay as they are) runs on the class's standardised embedding E with the
annotated images as the labelled points; unsure answers (-1) count as unlabelled. The score
is P(label 1) ("attention on the core object"), min-max scaled within the class, and the
instances above the class's ``keep_quantile`` of scores are kept.

Cases LabelSpreading cannot handle, and what is done instead (recorded in ``notes``):

* only one label among a class's annotations (say every sampled image was a 1): there is
  no contrast to spread, so the score is closeness to the nearest annotated image (all 1s)
  or distance from it (all 0s) -- "how much like what the person saw". Distances rather
  than rbf similarities, because exp(-gamma d^2) underflows to 0 for far points and would
  make every far point tie;
* no usable annotation in a class: every score is equal and the whole class is kept, since
  there is no evidence to drop anything;
* images with no kernel connection to any labelled image get P = 0.5 (no evidence);
* classes above ``max_dense`` images (CelebA): a dense rbf kernel would need n^2 memory, so
  the k-nearest-neighbour kernel is used there instead.

Ties: keeping is strict (score > the quantile), but when that would keep nothing (e.g. most
scores saturate at 1) the instances *at* the quantile are kept too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from debias.slim.space import standardise

__all__ = ["Propagation", "class_gammas", "keep_above_quantile", "propagate"]

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


def _one_label_score(points: np.ndarray, labelled: np.ndarray, label: int) -> np.ndarray:
    d2 = ((points[:, None, :] - points[None, labelled, :]) ** 2).sum(axis=2)
    nearest = np.sqrt(d2.min(axis=1))
    return -nearest if label == 1 else nearest


def _class_scores(points: np.ndarray, targets: np.ndarray, gamma: float, alpha: float,
                  max_dense: int) -> tuple[np.ndarray, str]:
    """Raw P(label 1) for one class's standardised points; targets are 1/0/-1 (unlabelled)."""
    labelled = np.flatnonzero(targets >= 0)
    present = set(targets[labelled].tolist())
    if not present:
        return np.full(len(points), 0.5), "no usable annotation: class kept whole"
    if len(present) == 1:
        label = present.pop()
        return (_one_label_score(points, labelled, label),
                f"all annotations are {label}: scored by similarity to them")
    from sklearn.semi_supervised import LabelSpreading  # where it runs: see linear_heads.py

    if len(points) > max_dense:
        model = LabelSpreading(kernel="knn", n_neighbors=KNN_NEIGHBOURS, alpha=alpha,
                               max_iter=1000)
        note = f"{len(points)} images > {max_dense}: knn kernel instead of rbf"
    else:
        model = LabelSpreading(kernel="rbf", gamma=gamma, alpha=alpha, max_iter=1000)
        note = "label spreading"
    model.fit(points, targets)
    dist = model.label_distributions_
    prob = dist[:, list(model.classes_).index(1)]
    disconnected = dist.sum(axis=1) <= 0
    return np.where(disconnected, 0.5, prob), note


def propagate(embedding: np.ndarray, y: np.ndarray, annotated_positions: np.ndarray,
              labels: np.ndarray, gamma: float | Sequence[float], alpha: float = 0.01,
              keep_quantile: float = 0.5, max_dense: int = MAX_DENSE) -> Propagation:
    """Spread the annotations over each class and keep its best-scoring instances.

    ``embedding`` (N, 2) and ``y`` are aligned with training positions; ``labels`` holds the
    answer (1, 0 or -1) for each of ``annotated_positions``.
    """
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
        raw, notes[c] = _class_scores(standardise(embedding[rows]), targets[rows], gammas[c],
                                      alpha, max_dense)
        scores[rows] = _minmax(raw)
        keep[rows] = keep_above_quantile(scores[rows], keep_quantile)
    return Propagation(scores=scores, keep=keep, notes=notes)
