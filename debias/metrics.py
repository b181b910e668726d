"""Group-robustness metrics: one record per evaluation, logged, reported and plotted as-is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GroupMetrics:
    """Accuracy overall, per (y, a) group, and the aggregates debiasing papers report."""

    avg_acc: float
    worst_group_acc: float
    unbiased_acc: float
    weighted_acc: float | None
    group_acc: dict[tuple[int, int], float]
    group_count: dict[tuple[int, int], int]
    missing_groups: tuple[tuple[int, int], ...]
    #: Accuracy per target class, and its minimum: selection without any bias label
    #: (SubpopBench's worst-class rule).
    class_acc: dict[int, float]
    worst_class_acc: float

    def as_flat(self, prefix: str) -> dict[str, float]:
        """Flat name -> number mapping, the shape experiment trackers want."""
        out = {
            f"{prefix}/avg_acc": self.avg_acc,
            f"{prefix}/worst_group_acc": self.worst_group_acc,
            f"{prefix}/unbiased_acc": self.unbiased_acc,
            f"{prefix}/worst_class_acc": self.worst_class_acc,
        }
        if self.weighted_acc is not None:
            out[f"{prefix}/weighted_acc"] = self.weighted_acc
        for (y, a), acc in self.group_acc.items():
            out[f"{prefix}/group_acc/{y}_{a}"] = acc
        for (y, a), count in self.group_count.items():
            out[f"{prefix}/group_count/{y}_{a}"] = float(count)
        for y, acc in self.class_acc.items():
            out[f"{prefix}/class_acc/{y}"] = acc
        return out


def _as_int_array(name: str, values: Any) -> np.ndarray:
    """Accept numpy arrays, lists or torch tensors (on any device) without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.bool_):
            return arr.astype(np.int64)
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def group_metrics(
    pred: Any,
    y: Any,
    a: Any,
    n_classes: int = 2,
    n_bias: int = 2,
    train_group_mix: Any = None,
) -> GroupMetrics:
    """Compute all group metrics from predictions, target labels and bias labels.

    Groups absent from this split are skipped (and listed in ``missing_groups``) rather than
    counted as 0 or 1, which would make worst-group accuracy meaningless. ``weighted_acc`` weighs
    each present group's accuracy by its share of the training split (Waterbirds convention:
    the test set is reweighted back to the training distribution), renormalised over the groups
    present here.
    """
    pred_arr = _as_int_array("pred", pred)
    y_arr = _as_int_array("y", y)
    a_arr = _as_int_array("a", a)
    if not (len(pred_arr) == len(y_arr) == len(a_arr)):
        raise ValueError(f"pred, y and a must have the same length, got {len(pred_arr)}, "
                         f"{len(y_arr)}, {len(a_arr)}")
    if len(y_arr) == 0:
        raise ValueError("cannot compute metrics on an empty set of predictions")
    if y_arr.min() < 0 or y_arr.max() >= n_classes:
        raise ValueError(f"y values must lie in [0, {n_classes}), got {y_arr.min()}..{y_arr.max()}")
    if a_arr.min() < 0 or a_arr.max() >= n_bias:
        raise ValueError(f"a values must lie in [0, {n_bias}), got {a_arr.min()}..{a_arr.max()}")

    correct = pred_arr == y_arr
    group_acc: dict[tuple[int, int], float] = {}
    group_count: dict[tuple[int, int], int] = {}
    missing: list[tuple[int, int]] = []
    for yi in range(n_classes):
        for ai in range(n_bias):
            in_group = (y_arr == yi) & (a_arr == ai)
            count = int(in_group.sum())
            if count == 0:
                missing.append((yi, ai))
                continue
            group_acc[(yi, ai)] = float(correct[in_group].mean())
            group_count[(yi, ai)] = count

    weighted: float | None = None
    if train_group_mix is not None:
        mix = np.asarray(train_group_mix, dtype=np.float64)
        if mix.shape != (n_classes, n_bias):
            raise ValueError(f"train_group_mix must have shape ({n_classes}, {n_bias}), "
                             f"got {mix.shape}")
        if np.any(mix < 0) or not np.all(np.isfinite(mix)):
            raise ValueError("train_group_mix must hold finite non-negative counts or proportions")
        weights = np.array([mix[g] for g in group_acc])
        if weights.sum() <= 0:
            raise ValueError("train_group_mix gives zero weight to every group present in "
                             "this split")
        accs = np.array(list(group_acc.values()))
        weighted = float((weights * accs).sum() / weights.sum())

    class_acc = {int(yi): float(correct[y_arr == yi].mean()) for yi in range(n_classes)
                 if (y_arr == yi).any()}
    accs_present = list(group_acc.values())
    return GroupMetrics(
        class_acc=class_acc,
        worst_class_acc=float(min(class_acc.values())),
        avg_acc=float(correct.mean()),
        worst_group_acc=float(min(accs_present)),
        unbiased_acc=float(np.mean(accs_present)),
        weighted_acc=weighted,
        group_acc=group_acc,
        group_count=group_count,
        missing_groups=tuple(missing),
    )


def cluster_purity(clusters: np.ndarray, bias: np.ndarray, n_clusters: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: size, and the share of its majority bias value (NaN for empty clusters).
    A purity near 1 means the clusters found the hidden bias attribute."""
    sizes = np.bincount(clusters, minlength=n_clusters)
    purity = np.full(n_clusters, np.nan)
    for c in np.flatnonzero(sizes):
        purity[c] = np.bincount(bias[clusters == c]).max() / sizes[c]
    return sizes, purity
