"""DFR, Deep Feature Reweighting, its validation variant (Kirichenko et al., "Last Layer
Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR 2023, Section 6).

The ERM reference model's penultimate features stay frozen; validation is split in two
halves (per class, drawn from the trial's seed). In one half, every group is subsampled to
the smallest group's size (a group-balanced draw; the paper's "balanced validation set");
an L1-regularised logistic regression is fitted on the standardised features of each of
``dfr.retrains`` such draws and the weights averaged. C comes from ``dfr.c_grid``, chosen by
the selection metric on the other half, never fitted. The shared last-layer trial
(:mod:`debias.last_layer`) runs the grid, exactly as it does for SLIM's ``last_layer`` mode:
only the subsets differ (SLIM curates them without bias labels).

It reads validation bias labels to *fit* (marked so in the report), not the training split's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from debias.last_layer import DEFAULT_C_GRID, LastLayerParams, grid_size
from debias.methods.base import BiasLabels, Method, SweepContext
from debias.params import Floats, Int, Number
from debias.seeding import derive_seed
from debias.stage_plan import StageRequest
from debias.stages import features_requests

__all__ = ["DFR", "DFRParams", "balanced_draw"]


class DFRParams(LastLayerParams):
    retrains: int = Int(10, 1, 1000, doc="group-balanced draws, one fit each, averaged")
    c_grid: list[Number] = Floats(DEFAULT_C_GRID,
                                  expected="a non-empty list of distinct numbers > 0",
                                  doc="inverse L1 strengths tried (the paper's grid)")
    class_weight_ratios: list[Number] = Floats(
        [1.0], expected="a non-empty list of distinct numbers > 0",
        doc="class weights tried (the draws are balanced already: 1 by default)")


def balanced_draw(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``groups`` holding every present group at the smallest one's size."""
    present = np.unique(groups)
    smallest = min(int((groups == g).sum()) for g in present)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(groups == g), smallest,
                                              replace=False) for g in present]))


class DFR(Method):
    name = "dfr"
    section = "dfr"
    Params = DFRParams
    summary = "last layer refitted on group-balanced validation draws (validation bias labels)"

    @classmethod
    def bias_labels(cls, params: DFRParams) -> BiasLabels:
        return BiasLabels(val=True)

    @classmethod
    def trial_kind(cls, params: DFRParams) -> str:
        return "last_layer"

    @classmethod
    def shared_stages(cls, config: dict[str, Any], data: Any) -> list[StageRequest]:
        return features_requests(config, data, "reference", ("val", "test"))

    @classmethod
    def steps(cls, ctx: SweepContext) -> str:
        assert isinstance(ctx.params, DFRParams)
        return f"{grid_size(ctx.params)} grid points (C x class weights)"

    def fit_subsets(self, fit_half: np.ndarray) -> list[np.ndarray]:
        groups = self.data.view("val").group[fit_half]
        draws = [fit_half[balanced_draw(groups, np.random.default_rng(
            derive_seed(self.seed, "dfr-draw", r)))] for r in range(self.params.retrains)]
        self._report = {"dfr/group_size": float(len(draws[0]) / len(np.unique(groups))),
                        "dfr/draw_size": float(len(draws[0]))}
        return draws

    def fit_report(self) -> dict[str, Any]:
        return self._report
