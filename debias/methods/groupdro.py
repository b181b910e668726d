"""GroupDRO: minimise the worst group's loss with online group weights (Sagawa et al.,
"Distributionally Robust Neural Networks for Group Shifts", ICLR 2020, Algorithm 1).

Each step, with L_g the mean loss of the batch's members of group g (0 for a group absent
from the batch) and n_g the group's training size:

- the adjusted loss L̃_g = L_g + C / sqrt(n_g) (their Eq. 5, "group adjustments"; C = 0 is
  plain GroupDRO),
- the weights q_g ← q_g · exp(η · L̃_g), renormalised to sum to 1 (exponentiated gradient
  ascent on the simplex),
- the loss Σ_g q_g · L_g, whose gradient trains the model; q carries no gradient.

q starts uniform and is part of the checkpoint, so a resumed trial continues the same
ascent. The paper's other ingredient, strong L2 regularisation (Waterbirds: SGD, lr 1e-5,
weight decay 1.0), is ``train.weight_decay``, searchable like every ``train`` knob. This is an
oracle: it reads the training split's bias labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from debias.methods.base import BiasLabels, Method
from debias.models import Classifier
from debias.params import Float, Number, Section

__all__ = ["GroupDRO", "GroupDROParams", "GroupWeights"]


class GroupDROParams(Section):
    eta: Number = Float(0.01, 0, 100, lo_open=True, doc="step size of the group weights")
    adjustment: Number = Float(0.0, 0, 100, doc="C of the C/sqrt(n_g) group adjustment")


class GroupWeights:
    """The online group weights q, apart from the model so the update can be checked on
    hand-made tensors."""

    def __init__(self, group_sizes: torch.Tensor, eta: float, adjustment: float) -> None:
        sizes = group_sizes.double()
        self.eta = eta
        self.n_groups = len(sizes)
        self.adjust = adjustment / sizes.clamp(min=1).sqrt()
        self.q = torch.full((self.n_groups,), 1.0 / self.n_groups, dtype=torch.float64)

    def group_losses(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Mean loss per group over the batch (0 where a group has no member)."""
        total = torch.zeros(self.n_groups, dtype=losses.dtype, device=losses.device)
        total = total.index_add(0, groups, losses)
        count = torch.bincount(groups, minlength=self.n_groups).to(losses.dtype)
        return total / count.clamp(min=1)

    def step(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Update q from this batch and return the robust loss Σ_g q_g L_g."""
        group_loss = self.group_losses(losses, groups)
        adjusted = group_loss.detach().double().cpu() + self.adjust
        q = self.q * torch.exp(self.eta * adjusted)
        self.q = q / q.sum()
        return (group_loss * self.q.to(group_loss.device, group_loss.dtype)).sum()


class GroupDRO(Method):
    #: The reference code trains without augmentation unless asked (docs/methods.md).
    reference_augments = False
    name = "groupdro"
    section = "groupdro"
    Params = GroupDROParams
    summary = "online group weights on the worst group's loss (oracle: training bias labels)"

    @classmethod
    def bias_labels(cls, params: GroupDROParams) -> BiasLabels:
        return BiasLabels(train=True)

    def prepare(self) -> None:
        train = self.data.view("train")
        n_groups = self.data.n_classes * self.data.n_bias
        self.groups = torch.as_tensor(train.y * self.data.n_bias + train.a)
        sizes = torch.bincount(self.groups, minlength=n_groups)
        self.weights = GroupWeights(sizes, self.params.eta, self.params.adjustment)

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(model(images), labels, reduction="none")
        return self.weights.step(losses, self.groups[positions].to(losses.device))

    def epoch_metrics(self) -> dict[str, float]:
        n_bias = self.data.n_bias
        return {f"groupdro/q/{g // n_bias}_{g % n_bias}": float(w)
                for g, w in enumerate(self.weights.q)}

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.weights.q.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.q = state["q"].clone().double()
