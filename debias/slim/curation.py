"""Balanced curation of the kept instances (ALGORITHMS.md item 7), two ways.

``reference`` (the default; :func:`curate_reference`) is the SLIM notebook's procedure
(xiweix/SLIM, cells 21-27, ``compute_optimal_clusters``): over all kept instances at once,
K1 clusters on E and K2 on Ebar chosen by its elbow rule (SSE for K = 2..5; d1 = diff(SSE)/2,
d2 = diff(d1)/2; K = the (argmax d2 + 1)-th candidate), cells (E-cluster i, Ebar-cluster j)
weighted p1[i] x p2[i][j] where p1 is the E-clusters' spread (median distance to the members'
mean) and p2[i] the Ebar-clusters' spread *within* E-cluster i, each normalised to sum 1; a
cell gets int(total x weight) images: k-means with that many centres on its Ebar
coordinates, one of the 3 nearest images per centre; a cell with fewer images than its share
gives them all and repeats random ones. Two defects of the notebook are not repeated: it
assumes K1 == K2 (its loop runs over K2 for both) and pairs the sizes with the non-empty
cells only, misaligning them when a cell is empty.

``class_balanced`` (:func:`curate`, this project's earlier rule) is described below.

The kept instances of a class are clustered twice: on E (what the model attends to) and on
Ebar (the background it ignores). Each (E-cluster, Ebar-cluster) pair is a cell, and a
cell's share of the budget is proportional to spread(E-cluster) x spread(Ebar-cluster),
spread being the median distance to the centroid: diverse regions get more images, so the
subset covers the attention space evenly instead of mirroring its densest mode.

Choices this module makes where the description is silent:

* **Elbow rule.** For K in the range, k-means inertia I(K) is computed for K-1..K+1 and the
  K with the largest second difference I(K-1) - 2 I(K) + I(K+1) wins (the sharpest bend of
  the curve; ties go to the smaller K). Every K in the range can win, including the ends.
* **Integer shares.** Largest-remainder rounding (ties to the lower cell index), capped at
  each cell's size, with whatever a full cell cannot take re-split among the others; so the
  allocation sums exactly to the budget whenever there are that many instances.
* **Per class.** The budget is first split equally between classes (capped at what each
  class kept, the excess going to the others), then curated within each class, so the
  subset is class-balanced: the original's 120 Waterbirds images came from both classes.
* **Within a cell**, n images are picked by k-means (k = n) on Ebar, one at random among the
  3 nearest to each centroid, padded at random from the rest of the cell if short.

Everything is deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from debias.slim.clustering import kmeans
from debias.slim.sampling import pick_near_centroids

__all__ = ["CELL_SHARES", "Curation", "allocate", "cluster_spread", "curate", "curate_class",
           "curate_reference", "elbow_k", "pick_in_cell", "reference_elbow"]

CELL_NEIGHBOURS = 3


@dataclass(frozen=True)
class Curation:
    """Curated training positions (unique, sorted) and per-class diagnostics."""

    positions: np.ndarray
    details: dict[int, dict[str, object]] = field(default_factory=dict)


def _inertia(x: np.ndarray, k: int, n_distinct: int, seed: int) -> float:
    if k >= n_distinct:
        return 0.0
    if k == 1:
        return float(((x - x.mean(axis=0)) ** 2).sum())
    return float(kmeans(x, k, seed).inertia_)


def elbow_k(x: np.ndarray, k_range: Sequence[int] = (2, 5), seed: int = 0) -> int:
    """K in [k_range[0], k_range[1]] at the sharpest bend of the inertia curve (see module).

    With fewer distinct points than the smallest K, the number of distinct points.
    """
    lo, hi = int(k_range[0]), int(k_range[-1])
    if not 1 <= lo <= hi:
        raise ValueError(f"k_range must be [min, max] with 1 <= min <= max, got {k_range!r}")
    x = np.asarray(x, dtype=np.float64)
    n_distinct = len(np.unique(x, axis=0)) if len(x) else 0
    candidates = [k for k in range(lo, hi + 1) if k <= n_distinct]
    if not candidates:
        return max(1, n_distinct)
    inertia = {k: _inertia(x, k, n_distinct, seed)
               for k in range(max(1, candidates[0] - 1), candidates[-1] + 2)}
    bend = [(inertia[k - 1] - 2 * inertia[k] + inertia[k + 1], -k) if k > 1 else (0.0, -k)
            for k in candidates]
    return -max(bend)[1]


def cluster_spread(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Median Euclidean distance of each cluster's members to its centroid (0 if empty)."""
    dist = np.linalg.norm(np.asarray(x) - centroids[labels], axis=1)
    return np.array([np.median(dist[labels == c]) if (labels == c).any() else 0.0
                     for c in range(len(centroids))])


def allocate(weights: np.ndarray, total: int, capacity: np.ndarray | None = None) -> np.ndarray:
    """Integer shares proportional to ``weights`` summing exactly to ``total`` (or to the
    total capacity, if smaller), never above a cell's capacity; largest-remainder rounding.

    Cells with zero weight only receive images when the weighted ones are full; if every
    open cell has zero weight they share equally.
    """
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    total = int(total)
    cap = np.full(len(w), max(total, 0), dtype=np.int64) if capacity is None else np.asarray(
        capacity, dtype=np.int64)
    target = max(0, min(total, int(cap.sum())))
    alloc = np.zeros(len(w), dtype=np.int64)
    while (left := target - int(alloc.sum())) > 0:
        room = cap - alloc
        active = room > 0
        ww = np.where(active, w, 0.0)
        if ww.sum() <= 0:
            ww = active.astype(np.float64)
        quota = left * ww / ww.sum()
        base = np.floor(quota).astype(np.int64)
        if (base > room).any():  # some cells overflow: fill them, re-split the rest
            alloc += np.minimum(base, room)
            continue
        alloc += base
        frac = quota - base
        open_cells = np.flatnonzero(active & (room - base > 0))
        order = open_cells[np.lexsort((open_cells, -frac[open_cells]))]
        alloc[order[:left - int(base.sum())]] += 1
    return alloc


def pick_in_cell(points: np.ndarray, n: int, seed: int, rng: np.random.Generator,
                 neighbours: int = CELL_NEIGHBOURS) -> np.ndarray:
    """n distinct rows of ``points`` (Ebar of a cell): k-means (k = n), one of the
    ``neighbours`` nearest per centroid, padded at random if short."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n >= len(points):
        return np.arange(len(points), dtype=np.int64)
    km = kmeans(points, n, seed)
    taken: set[int] = set()
    picks = pick_near_centroids(points, km.cluster_centers_, neighbours, rng, taken)
    if len(picks) < n:
        rest = np.array([r for r in range(len(points)) if r not in taken], dtype=np.int64)
        picks.extend(int(r) for r in rng.permutation(rest)[:n - len(picks)])
    return np.asarray(picks, dtype=np.int64)


CELL_SHARES = ("spread", "uniform")


def curate_class(e: np.ndarray, e_bar: np.ndarray, n: int, k_range: Sequence[int] = (2, 5),
                 seed: int = 0, stream: int = 0, cell_share: str = "spread",
                 ) -> tuple[np.ndarray, dict[str, object]]:
    """n rows (local indices) from one class's kept instances, balanced over the cells.

    ``cell_share='spread'`` is the original's rule (share ∝ spread x spread); ``'uniform'``
    gives every non-empty cell an equal share, which keeps a small, tight cell (often a
    minority group, whose spread is small) from being starved.
    """
    e = np.asarray(e, dtype=np.float64)
    e_bar = np.asarray(e_bar, dtype=np.float64)
    if n <= 0 or len(e) == 0:
        return np.zeros(0, dtype=np.int64), {"k_e": 0, "k_ebar": 0, "allocation": []}
    k1, k2 = elbow_k(e, k_range, seed), elbow_k(e_bar, k_range, seed)
    km1, km2 = kmeans(e, k1, seed), kmeans(e_bar, k2, seed)
    l1, l2 = km1.labels_, km2.labels_
    s1 = cluster_spread(e, l1, km1.cluster_centers_)
    s2 = cluster_spread(e_bar, l2, km2.cluster_centers_)
    cell = l1 * k2 + l2
    capacity = np.bincount(cell, minlength=k1 * k2)
    if cell_share == "uniform":
        weights = (capacity > 0).astype(np.float64)
    else:
        weights = np.outer(s1, s2).ravel() * (capacity > 0)
    alloc = allocate(weights, n, capacity)
    chosen: list[np.ndarray] = []
    for c in np.flatnonzero(alloc):
        members = np.flatnonzero(cell == c)
        rng = np.random.default_rng([seed, stream, int(c)])
        chosen.append(members[pick_in_cell(e_bar[members], int(alloc[c]), seed, rng)])
    rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return rows, {"k_e": k1, "k_ebar": k2, "allocation": alloc.tolist()}


def curate(e: np.ndarray, e_bar: np.ndarray, y: np.ndarray, candidates: np.ndarray, total: int,
           k_range: Sequence[int] = (2, 5), seed: int = 0, cell_share: str = "spread",
           ) -> Curation:
    """The curated subset: ``total`` training positions (fewer only if fewer candidates),
    split equally between classes, each class curated over its cells.

    ``e``, ``e_bar`` (N, 2) and ``y`` are aligned with training positions; ``candidates``
    are the positions kept by propagation.
    """
    y = np.asarray(y, dtype=np.int64)
    candidates = np.unique(np.asarray(candidates, dtype=np.int64))
    n_classes = int(y.max()) + 1 if len(y) else 0
    per_class = [candidates[y[candidates] == c] for c in range(n_classes)]
    shares = allocate(np.ones(n_classes), total, np.array([len(p) for p in per_class]))
    chosen: list[np.ndarray] = []
    details: dict[int, dict[str, object]] = {}
    for c, (pos, n) in enumerate(zip(per_class, shares, strict=True)):
        rows, details[c] = curate_class(e[pos], e_bar[pos], int(n), k_range, seed, stream=c,
                                        cell_share=cell_share)
        chosen.append(pos[rows])
    positions = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return Curation(positions=positions.astype(np.int64), details=details)


def reference_elbow(x: np.ndarray, k_range: Sequence[int] = (2, 5), seed: int = 0) -> int:
    """The notebook's elbow: with SSE(K) for K in the range, d1 = diff(SSE) / 2,
    d2 = diff(d1) / 2, the K at index argmax(d2) + 1 (so neither end of the range, unless the
    range or the distinct points are too few for a second difference)."""
    x = np.asarray(x, dtype=np.float64)
    n_distinct = len(np.unique(x, axis=0)) if len(x) else 0
    ks = [k for k in range(int(k_range[0]), int(k_range[-1]) + 1) if k <= n_distinct]
    if not ks:
        return max(1, n_distinct)
    if len(ks) < 3:
        return ks[-1]
    sse = np.array([_inertia(x, k, n_distinct, seed) for k in ks])
    d2 = np.diff(np.diff(sse) / 2) / 2
    return ks[int(np.argmax(d2)) + 1]


def _spread_about_mean(x: np.ndarray) -> float:
    """Median distance of points to their mean (the notebook's spread of a cluster)."""
    return float(np.median(np.linalg.norm(x - x.mean(axis=0), axis=1))) if len(x) else 0.0


def _normalised(v: np.ndarray) -> np.ndarray:
    total = v.sum()
    return v / total if total > 0 else np.full(len(v), 1.0 / max(1, len(v)))


def curate_reference(e: np.ndarray, e_bar: np.ndarray, candidates: np.ndarray, total: int,
                     k_range: Sequence[int] = (2, 5), seed: int = 0,
                     cell_share: str = "spread") -> Curation:
    """The reference's curation (see the module docstring) of ``total`` positions among
    ``candidates`` (positions into ``e`` and ``e_bar``); positions may repeat where a cell
    is padded. ``cell_share='uniform'`` weights every non-empty cell equally (an ablation)."""
    candidates = np.unique(np.asarray(candidates, dtype=np.int64))
    if total <= 0 or len(candidates) == 0:
        return Curation(positions=np.zeros(0, dtype=np.int64))
    pe = np.asarray(e, dtype=np.float64)[candidates]
    pb = np.asarray(e_bar, dtype=np.float64)[candidates]
    k1, k2 = reference_elbow(pe, k_range, seed), reference_elbow(pb, k_range, seed)
    l1, l2 = kmeans(pe, k1, seed).labels_, kmeans(pb, k2, seed).labels_
    p1 = _normalised(np.array([_spread_about_mean(pe[l1 == i]) for i in range(k1)]))
    weights = np.zeros((k1, k2))
    for i in range(k1):
        inside = l1 == i
        p2 = _normalised(np.array([_spread_about_mean(pb[inside & (l2 == j)])
                                   for j in range(k2)]))
        weights[i] = p1[i] * p2 * np.array([(inside & (l2 == j)).any() for j in range(k2)])
    if cell_share == "uniform":
        weights = (weights > 0).astype(np.float64)
    weights = _normalised(weights.ravel())
    rng = np.random.default_rng([seed, 7])
    chosen: list[np.ndarray] = []
    sizes = (total * weights).astype(np.int64)  # int(), as the notebook: the sum may fall short
    cells = l1 * k2 + l2
    for c in np.flatnonzero(sizes):
        members = np.flatnonzero(cells == c)
        n = int(sizes[c])
        if n <= len(members):
            local = kmeans(pb[members], n, seed)
            picks = pick_near_centroids(pb[members], local.cluster_centers_, CELL_NEIGHBOURS,
                                        rng)
            chosen.append(members[np.asarray(picks, dtype=np.int64)])
        else:  # every image of the cell, then random repeats up to its share
            chosen.append(np.concatenate([members, rng.choice(members, n - len(members))]))
    positions = np.sort(candidates[np.concatenate(chosen)]) if chosen else np.zeros(
        0, dtype=np.int64)
    return Curation(positions=positions.astype(np.int64),
                    details={-1: {"k_e": k1, "k_ebar": k2, "allocation": sizes.tolist()}})
