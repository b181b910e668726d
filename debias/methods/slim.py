"""SLIM: GradCAM attention of an ERM reference model, a few attention annotations, label
propagation and a feature-balanced curated subset, then retraining (ALGORITHMS.md, "SLIM").

Everything up to the curated subset is cached (:mod:`debias.slim.pipeline`): a sweep over
retraining knobs (lr, weight decay, epochs, the last-layer grid) computes GradCAM and the
curation once. The trial is the retraining, in one of the spec's two modes:

- ``full`` (this class, through the shared SGD loop): a fresh model (the sweep's backbone and
  weights) trained on the curated *train* subset;
- ``last_layer`` (:class:`debias.slim.last_layer.LastLayerTrial`): DFR-style L1 logistic
  regression on the reference model's frozen features of a curated *validation* subset, over
  a grid of C and class weights, averaged over retrains; the other half of validation
  selects. :mod:`debias.slim.modes` serves both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from debias.methods.base import Method
from debias.models import Classifier
from debias.slim.modes import curation_for, curation_metrics, gradcam_examples

__all__ = ["SLIM"]


class SLIM(Method):
    """Full retraining on the curated training subset (``slim.retrain: full``)."""

    name = "slim"

    def prepare(self) -> None:
        if self.params["retrain"] != "full":
            raise ValueError("slim.retrain 'last_layer' is not trained by SGD epochs: build the "
                             "trial with debias.trainable.build_trial (LastLayerTrial)")
        self.reference, ref_key, self.curation = curation_for(self.config, self.data,
                                                              self.cache, self.device)
        self.positions = np.sort(self.curation["positions"].numpy())
        self.overlays = gradcam_examples(self.config, self.data, self.reference, self.device,
                                         ref_key, self.curation)
        self._first_epoch = True

    def train_positions(self) -> np.ndarray:
        return self.positions

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    def epoch_metrics(self) -> dict[str, Any]:
        if not self._first_epoch:
            return {}
        self._first_epoch = False
        return curation_metrics(self.curation, self.data, self.positions, self.overlays)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
        self._first_epoch = False
