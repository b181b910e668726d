"""The numerics of last-layer retraining the DFR way (Kirichenko et al., "Last Layer
Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR 2023): L1-regularised
logistic regression on frozen features, shared by DFR (group-balanced subsets) and SLIM's
``last_layer`` mode (curated subsets). The trial around them is :mod:`debias.last_layer`.

Why these pieces:

- The validation split is cut in two: a method fits in one half; the other half, never
  fitted, is what model selection (and the grid over C and class weights) is scored on.
- Each fit standardises its features with a scaler (the reference DFR code fits it on the
  very subset it fits while tuning, and on all of validation for the final head), and is
  then folded back through that standardisation, so every head is one linear layer on the
  raw penultimate features (DFR's embeddings: the trunk's average-pooled output, not
  L2-normalised): the checkpoint is a plain weight and bias.
- Several fits (``retrains``, on subsets drawn with different seeds) are averaged: DFR's
  variance reduction. Averaging folded heads equals averaging the standardised coefficients
  when the fits share one scaler, which is how the reference averages its final head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LinearHead", "class_weight_options", "fit_averaged_head", "random_halves",
           "split_halves", "standardiser"]


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


def random_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) positions of ``n``: DFR's tuning split, a random permutation cut in
    two (not stratified), the fit half being the second (the larger when ``n`` is odd)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n // 2:]), np.sort(order[:n // 2])


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
    """(weight, bias) as n_classes logits on the given (standardised) features: the
    reference's ``LogisticRegression(penalty="l1", C=c, solver="liblinear")`` with
    scikit-learn's other defaults (``tol`` 1e-4, ``max_iter`` 100), seeded."""
    from sklearn.linear_model import LogisticRegression

    solver = "liblinear" if n_classes == 2 else "saga"  # liblinear is binary-only
    model = LogisticRegression(C=c, solver=solver, class_weight=class_weight, random_state=seed,
                               max_iter=100 if n_classes == 2 else 5000, **_l1())
    model.fit(x, y)
    coef, intercept = model.coef_, model.intercept_
    if n_classes == 2:  # one decision function -> two logits, (-f/2, f/2): softmax = sigmoid(f)
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept


def fit_averaged_head(subsets: Sequence[tuple[np.ndarray, np.ndarray]], c: float,
                      class_weight: dict[int, float], n_classes: int, seed: int,
                      scaler: tuple[np.ndarray, np.ndarray] | None = None) -> LinearHead:
    """One L1 logistic regression per (raw features, labels) subset, each on its features
    standardised with ``scaler`` (``(mean, std)``; None: each subset's own statistics, as
    the reference standardises while tuning), folded back to raw features and averaged.
    Retrain r is seeded ``seed + r``.

    Every subset must hold every class (a curated subset does: it is drawn per class).
    """
    weights, biases = [], []
    for r, (x, y) in enumerate(subsets):
        present = np.unique(y)
        if len(present) != n_classes:
            raise ValueError(f"retrain {r}: the fitted subset holds classes {present.tolist()}"
                             f", expected all {n_classes}; give it more images (e.g. raise "
                             "slim.curated_size)")
        mean, std = scaler if scaler is not None else standardiser(x)
        w, b = _fit_one((x - mean) / std, y, c, class_weight, n_classes, seed + r)
        weights.append(w / std)
        biases.append(b - (w / std) @ mean)
    return LinearHead(weight=np.mean(weights, axis=0), bias=np.mean(biases, axis=0))


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature; constant features get std 1 rather than a division by 0."""
    x = np.asarray(features, dtype=np.float64)
    std = x.std(axis=0)
    return x.mean(axis=0), np.where(std > 1e-12, std, 1.0)
