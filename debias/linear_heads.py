"""The numerics of last-layer retraining the DFR way (Kirichenko et al., "Last Layer
Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR 2023): L1-regularised
logistic regression on frozen features, shared by DFR (group-balanced subsets) and SLIM's
``last_layer`` mode (curated subsets). The trial around them is :mod:`debias.last_layer`.

Why these pieces:

- The validation split is cut in two, per class: a method fits in one half; the other half,
  never fitted, is what model selection (and the grid over C and class weights) is scored on.
- Each grid point is fitted once per subset (``retrains`` of them, drawn with different
  seeds) and the coefficients are averaged: DFR's variance reduction.
- The head is folded back through the standardisation, so it is one linear layer on the
  features it was given (here the reference trunk's L2-normalised features, the stage
  ClusterFix shares; DFR uses raw embeddings): the checkpoint is a plain weight and bias.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LinearHead", "class_weight_options", "fit_averaged_head", "split_halves",
           "standardiser"]


def _l1() -> dict[str, object]:
    """How an L1 penalty is asked for: ``penalty`` is deprecated from scikit-learn 1.8 (which
    needs Python 3.11) in favour of ``l1_ratio``; older releases only know ``penalty``.
    (scikit-learn is imported here, not with the module: it takes ~1 s, and every trial
    process imports this module whether or not it fits a head.)"""
    from sklearn import __version__

    return ({"l1_ratio": 1.0} if tuple(map(int, re.findall(r"\d+", __version__)[:2])) >= (1, 8)
            else {"penalty": "l1"})


def split_halves(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) positions: a random half of every class each (the odd one to fit).

    Stratified by class only: the halves never depend on bias labels.
    """
    y = np.asarray(y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_fit = (len(members) + 1) // 2
        fit.append(members[:n_fit])
        held.append(members[n_fit:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(fit or [empty])), np.sort(np.concatenate(held or [empty])))


def class_weight_options(ratios: Sequence[float], n_classes: int) -> list[dict[int, float]]:
    """Equal weights, then for every ratio w != 1 and every class c, class c weighted w (the
    others 1): DFR's {0: 1, 1: w} and {0: w, 1: 1} pairs, for any number of classes."""
    options = [dict.fromkeys(range(n_classes), 1.0)]
    for w in ratios:
        for c in range(n_classes):
            option = {**dict.fromkeys(range(n_classes), 1.0), c: float(w)}
            if option not in options:
                options.append(option)
    return options


@dataclass(frozen=True)
class LinearHead:
    """A linear classifier on raw features: logits = features @ weight.T + bias."""

    weight: np.ndarray  # (n_classes, d)
    bias: np.ndarray  # (n_classes,)

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    @property
    def nonzero(self) -> int:
        """Features the head reads (any class): L1's sparsity."""
        return int(np.count_nonzero(np.any(self.weight != 0, axis=0)))


def _fit_one(x: np.ndarray, y: np.ndarray, c: float, class_weight: dict[int, float],
             n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) as n_classes logits on the given (standardised) features."""
    from sklearn.linear_model import LogisticRegression

    solver = "liblinear" if n_classes == 2 else "saga"  # liblinear is binary-only
    model = LogisticRegression(C=c, solver=solver, class_weight=class_weight, random_state=seed,
                               max_iter=1000 if n_classes == 2 else 5000, **_l1())
    model.fit(x, y)
    coef, intercept = model.coef_, model.intercept_
    if n_classes == 2:  # one decision function -> two logits, (-f/2, f/2): softmax = sigmoid(f)
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def fit_averaged_head(subsets: Sequence[tuple[np.ndarray, np.ndarray]], c: float,
                      class_weight: dict[int, float], n_classes: int, mean: np.ndarray,
                      std: np.ndarray, seed: int) -> LinearHead:
    """One L1 logistic regression per (features, labels) subset, on features standardised
    with (``mean``, ``std``), coefficients averaged and folded back to raw features.

    Every subset must hold every class (a curated subset does: it is drawn per class).
    """
    weights, biases = [], []
    for r, (x, y) in enumerate(subsets):
        present = np.unique(y)
        if len(present) != n_classes:
            raise ValueError(f"retrain {r}: the fitted subset holds classes {present.tolist()}"
                             f", expected all {n_classes}; give it more images (e.g. raise "
                             "slim.curated_size)")
        w, b = _fit_one((x - mean) / std, y, c, class_weight, n_classes, seed + r)
        weights.append(w)
        biases.append(b)
    w_std, b_std = np.mean(weights, axis=0), np.mean(biases, axis=0)
    weight = w_std / std
    return LinearHead(weight=weight, bias=b_std - weight @ mean)


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature; constant features get std 1 rather than a division by 0."""
    x = np.asarray(features, dtype=np.float64)
    std = x.std(axis=0)
    return x.mean(axis=0), np.where(std > 1e-12, std, 1.0)
