"""Empirical risk minimisation: cross-entropy on the target, the reference every debiasing
method must beat, and the reference model SLIM, JTT, DFR and ClusterFix start from.

``erm.balance`` adds the data-balancing baselines of Idrissi et al., "Simple data balancing
achieves competitive worst-group-accuracy" (CLeaR 2022), which change only which examples an
epoch visits:

- ``class``: batches sampled with probability proportional to 1/n_y (their RWY): equal
  expected counts per class; no bias labels;
- ``group_subsample``: every group subsampled to the smallest group's size, a fixed subset
  per seed (their SUBG); uses the training bias labels;
- ``group_reweight``: batches sampled with probability proportional to 1/n_g (their RWG);
  uses the training bias labels.

An epoch has as many draws as the (sub)set it samples from, so budgets in epochs compare.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from debias.methods.base import BiasLabels, Method
from debias.params import Choice, Section
from debias.seeding import derive_seed

__all__ = ["ERM", "ERMParams", "balanced_draws", "group_subsample"]


class ERMParams(Section):
    balance: Literal["none", "class", "group_subsample", "group_reweight"] = Choice(
        "none", doc="class: RWY; group_subsample: SUBG; group_reweight: RWG (Idrissi et al. "
                    "2022); the group variants use training bias labels")


def balanced_draws(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positions drawn with replacement, each with probability proportional to
    1 / (size of its label's stratum): every stratum is expected equally often."""
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(len(labels), size=n, replace=True, p=p / p.sum())


def group_subsample(groups: np.ndarray, seed: int) -> np.ndarray:
    """Sorted positions of a subset holding every present group at the smallest one's size."""
    rng = np.random.default_rng(seed)
    present = np.unique(groups)
    smallest = min(int((groups == g).sum()) for g in present)
    keep = [rng.choice(np.flatnonzero(groups == g), size=smallest, replace=False)
            for g in present]
    return np.sort(np.concatenate(keep))


class ERM(Method):
    name = "erm"
    section = "erm"
    Params = ERMParams
    summary = "cross-entropy; optionally class- or group-balanced data (RWY, SUBG, RWG)"

    @classmethod
    def bias_labels(cls, params: ERMParams, dataset: str | None = None) -> BiasLabels:
        return BiasLabels(train=params.balance.startswith("group"))

    def prepare(self) -> None:
        train = self.data.view("train")
        self._labels: np.ndarray | None = None
        self._positions = np.arange(len(train))
        if self.params.balance == "class":
            self._labels = train.y
        elif self.params.balance == "group_reweight":
            self._labels = train.group
        elif self.params.balance == "group_subsample":
            self._positions = group_subsample(train.group, derive_seed(self.seed, "subg"))

    def train_positions(self) -> np.ndarray:
        return self._positions

    def epoch_order(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        if self._labels is None:
            return rng.permutation(self._positions)
        return balanced_draws(self._labels, len(self._labels), rng)

    def epoch_metrics(self) -> dict[str, float]:
        if self.params.balance == "group_subsample":
            return {"erm/subset_size": float(len(self._positions))}
        return {}
