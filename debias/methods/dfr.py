"""DFR, Deep Feature Reweighting, its validation variant (Kirichenko et al., "Last Layer
Re-Training is Sufficient for Robustness to Spurious Correlations", ICLR 2023, Section 6),
as the reference code computes it (``dfr_evaluate_spurious.py`` of the authors' repositories:
``dfr_on_validation_tune`` then ``dfr_on_validation_eval``).

The ERM reference model's raw penultimate features stay frozen.

- **Tune C.** Validation is cut into two random halves (a permutation cut in two, not
  stratified, drawn from the trial's seed). In the second half every group is subsampled to
  the smallest group's size (a group-balanced draw); an L1 logistic regression (liblinear)
  is fitted on its features standardised with the draw's own statistics (``dfr.retrains``
  draws, averaged; the reference tunes with one) and scored on the held-out half by the
  selection metric (the reference: its worst-group accuracy). The grid is ``dfr.c_grid``
  (the reference's seven values); class weights stay equal, as the reference's DFR(Val)
  path never tunes them.
- **Final head.** The selected C refitted on ``dfr.final_retrains`` (20) group-balanced draws
  of the *whole* validation set, standardised with the statistics of all of validation (the
  authors' current repository; their first fitted the final scaler on training embeddings),
  coefficients and intercepts averaged; its test predictions are the trial's.

The shared last-layer trial (:mod:`debias.last_layer`) runs this, as it does for SLIM's
``last_layer`` mode: only the subsets differ (SLIM curates them without bias labels). DFR
reads validation bias labels to *fit* (marked so in the report), not the training split's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from debias.last_layer import DEFAULT_C_GRID, LastLayerParams, grid_size
from debias.linear_heads import random_halves
from debias.methods.base import BiasLabels, Method, SweepContext
from debias.params import Floats, Int, Number
from debias.seeding import derive_seed
from debias.stage_plan import StageRequest
from debias.stages import features_requests
from debias.trial_config import TrialConfig

__all__ = ["DFR", "DFRParams", "balanced_draw"]


class DFRParams(LastLayerParams):
    retrains: int = Int(1, 1, 1000, doc="group-balanced draws of the fit half per grid "
                                        "point, one fit each, averaged (the reference: 1)")
    final_retrains: int = Int(20, 1, 1000, searchable=False,
                              doc="group-balanced draws of all of validation, one fit each, "
                                  "averaged into the final head (the reference: 20)")
    c_grid: list[Number] = Floats(DEFAULT_C_GRID,
                                  expected="a non-empty list of distinct numbers > 0",
                                  doc="inverse L1 strengths tried (the paper's grid)")
    class_weight_ratios: list[Number] = Floats(
        [1.0], expected="a non-empty list of distinct numbers > 0",
        doc="class weights tried (the reference's DFR(Val) keeps them equal: 1)")


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
    def bias_labels(cls, params: DFRParams, dataset: str | None = None) -> BiasLabels:
        return BiasLabels(val=True)

    @classmethod
    def trial_kind(cls, params: DFRParams) -> str:
        return "last_layer"

    @classmethod
    def shared_stages(cls, config: TrialConfig, data: Any) -> list[StageRequest]:
        return features_requests(config, data, "reference", ("val", "test"), normalize=False)

    @classmethod
    def steps(cls, ctx: SweepContext) -> str:
        assert isinstance(ctx.params, DFRParams)
        return f"{grid_size(ctx.params)} grid points (C x class weights)"

    def fit_halves(self) -> tuple[np.ndarray, np.ndarray]:
        return random_halves(len(self.data.view("val")), derive_seed(self.seed, "val-halves"))

    def fit_subsets(self, fit_half: np.ndarray) -> list[np.ndarray]:
        groups = self.data.view("val").group[fit_half]
        draws = [fit_half[balanced_draw(groups, np.random.default_rng(
            derive_seed(self.seed, "dfr-draw", r)))] for r in range(self.params.retrains)]
        self._report = {"dfr/group_size": float(len(draws[0]) / len(np.unique(groups))),
                        "dfr/draw_size": float(len(draws[0]))}
        return draws

    def final_subsets(self) -> list[np.ndarray]:
        groups = self.data.view("val").group
        return [balanced_draw(groups, np.random.default_rng(
            derive_seed(self.seed, "dfr-final-draw", r)))
            for r in range(self.params.final_retrains)]

    def fit_report(self) -> dict[str, Any]:
        return self._report
