"""Which images a person is asked about: a spread-out sample of each class's attention space.

Per class, k-means with k = that class's budget places one centroid in each region of the
2-D embedding E; the image shown for a centroid is drawn at random among its ``neighbours``
nearest images, so the sample covers the space without always taking the single most
central point. Draws never repeat an image: a centroid whose nearest images are all taken
moves on to the next nearest, so a class yields exactly min(budget, class size) images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from debias.slim.clustering import kmeans

__all__ = ["per_class_budget", "pick_near_centroids", "sample_for_annotation"]


def per_class_budget(budget: int | Sequence[int], n_classes: int) -> list[int]:
    """One budget for every class, or one per class (a list of n_classes counts)."""
    if isinstance(budget, int | np.integer):
        budgets = [int(budget)] * n_classes
    else:
        budgets = [int(b) for b in budget]
    if len(budgets) != n_classes or any(b < 0 for b in budgets):
        raise ValueError(f"budget must be a non-negative count or one per class "
                         f"({n_classes}), got {budget!r}")
    return budgets


def pick_near_centroids(points: np.ndarray, centroids: np.ndarray, neighbours: int,
                        rng: np.random.Generator, taken: set[int] | None = None) -> list[int]:
    """For each centroid in turn, a random row among its ``neighbours`` nearest rows not yet
    taken (rows of ``points``); at most one row per centroid, never a row twice."""
    taken = set() if taken is None else taken
    picks: list[int] = []
    for centre in centroids:
        order = np.argsort(((points - centre) ** 2).sum(axis=1), kind="stable")
        free = [int(r) for r in order if int(r) not in taken][:max(1, neighbours)]
        if not free:
            break
        row = free[int(rng.integers(len(free)))]
        taken.add(row)
        picks.append(row)
    return picks


def sample_for_annotation(embedding: np.ndarray, y: np.ndarray, budget: int | Sequence[int],
                          neighbours: int = 5, seed: int = 0) -> np.ndarray:
    """Train positions to annotate (int64, unique), class by class, deterministic for a seed.

    ``embedding`` (N, 2) and ``y`` (N,) are aligned with the training split's positions.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    y = np.asarray(y)
    n_classes = int(y.max()) + 1 if len(y) else 0
    budgets = per_class_budget(budget, n_classes)
    chosen: list[int] = []
    for c, k in enumerate(budgets):
        rows = np.flatnonzero(y == c)
        k = min(k, len(rows))
        if k == 0:
            continue
        points = embedding[rows]
        km = kmeans(points, k, seed)
        rng = np.random.default_rng([seed, c])
        picks = pick_near_centroids(points, km.cluster_centers_, neighbours, rng)
        chosen.extend(int(rows[p]) for p in picks)
    return np.asarray(chosen, dtype=np.int64)
