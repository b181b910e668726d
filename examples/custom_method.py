"""A method defined outside debias-sweep: focal loss (Lin et al., "Focal Loss for Dense
Object Detection", ICCV 2017, Eq. 5) on top of ERM.

FL(p_t) = -(1 - p_t)^gamma * log(p_t): examples the model already gets right (p_t near 1)
count less, so training keeps pushing on the hard ones, which under a spurious correlation
are mostly the minority groups'. It reads no bias labels. gamma = 0 is plain ERM.

This file is all a method needs: its parameters as a typed section (defaults, bounds, what a
search may vary), and the loss of a batch. Run it on the embedded dataset with

    PYTHONPATH=examples python launch.py examples/custom_method.yaml

(the sweep file says ``method: custom_method:FocalLoss``). Ray's workers inherit PYTHONPATH
from a local Ray; on a cluster, install the module on every node or submit with --submit.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from debias.methods import Method
from debias.models import Classifier
from debias.params import Float, Number, Section


class FocalParams(Section):
    """The sweep file's ``focal:`` section."""

    gamma: Number = Float(2.0, 0, 10, doc="focusing parameter; 0 is cross-entropy")


class FocalLoss(Method):
    name = "focal"
    section = "focal"
    Params = FocalParams
    summary = "cross-entropy down-weighting well-classified examples (no bias labels)"

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(model(images), dim=1).gather(1, labels[:, None]).squeeze(1)
        return (-(1 - log_p.exp()) ** self.params.gamma * log_p).mean()

    def epoch_metrics(self) -> dict[str, float]:
        return {"focal/gamma": float(self.params.gamma)}
