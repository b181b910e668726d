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
ascent. As in the reference code (kohpangwei/group_DRO, ``loss.py``), q is updated first from
the batch's detached group losses and the loss uses the *updated* q.

Batches: every command of the reference passes ``--reweight_groups``, which draws each epoch's
N examples with replacement with probability proportional to 1/n_g (equal expected counts
per group); ``groupdro.reweight_groups`` (default true) does the same. Without it, the
smallest group of Waterbirds is absent from about a fifth of batches of 128 and its weight
decays between its appearances. The reference trains without augmentation
(``reference_augments``). The paper's other ingredient, strong L2 regularisation
(Waterbirds: SGD, lr 1e-5, weight decay 1.0), is ``train.weight_decay``, searchable like every
``train`` knob. This is an oracle: it reads the training split's bias labels.

Deviation (docs/methods.md): with C > 0 the reference adds the C/sqrt(n_g) terms into its
returned loss too (an in-place ``+=`` on an aliased tensor); they are constants, so the
gradient is the same, and the loss logged here is the robust loss Σ_g q_g L_g.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from debias.methods.base import BiasLabels, Method
from debias.methods.erm import balanced_draws
from debias.models import Classifier
from debias.params import Flag, Float, Number, Section

__all__ = ["GroupDRO", "GroupDROParams", "GroupWeights", "batch_mix", "smallest_group"]


class GroupDROParams(Section):
    eta: Number = Float(0.01, 0, 100, lo_open=True, doc="step size of the group weights")
    adjustment: Number = Float(0.0, 0, 100, doc="C of the C/sqrt(n_g) group adjustment")
    reweight_groups: bool = Flag(
        True, doc="draw each epoch's examples with probability proportional to 1/n_g (the "
                  "reference's --reweight_groups, in all its commands); false: a permutation")


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


def smallest_group(groups: np.ndarray) -> int:
    """The smallest group present."""
    counts = np.bincount(groups)
    present = np.flatnonzero(counts)
    return int(present[np.argmin(counts[present])])


def batch_mix(drawn: np.ndarray, smallest: int, batch_size: int) -> dict[str, float]:
    """How an epoch's batches (``drawn``: their groups, in order) held the smallest training
    group: its share of the examples (``groupdro/min_group_share``) and the share of batches
    holding none of it (``groupdro/batches_without_min_group``): a reader's check that the
    batches are group-balanced."""
    member = drawn == smallest
    batches = [member[i:i + batch_size] for i in range(0, len(drawn), batch_size)]
    return {"groupdro/min_group_share": float(member.mean()),
            "groupdro/batches_without_min_group": float(np.mean([not b.any() for b in batches]))}


class GroupDRO(Method):
    #: The reference code trains without augmentation unless asked (docs/methods.md).
    reference_augments = False
    name = "groupdro"
    section = "groupdro"
    Params = GroupDROParams
    summary = "online group weights on the worst group's loss (oracle: training bias labels)"

    @classmethod
    def bias_labels(cls, params: GroupDROParams, dataset: str | None = None) -> BiasLabels:
        return BiasLabels(train=True)

    def prepare(self) -> None:
        train = self.data.view("train")
        n_groups = self.data.n_classes * self.data.n_bias
        self.groups = torch.as_tensor(train.y * self.data.n_bias + train.a)
        sizes = torch.bincount(self.groups, minlength=n_groups)
        self.weights = GroupWeights(sizes, self.params.eta, self.params.adjustment)

    def epoch_order(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        groups = self.groups.numpy()
        order = (balanced_draws(groups, len(groups), rng) if self.params.reweight_groups
                 else rng.permutation(len(groups)))
        self._mix = batch_mix(groups[order], smallest_group(groups),
                              self.config.train.batch_size)
        return order

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(model(images), labels, reduction="none")
        return self.weights.step(losses, self.groups[positions].to(losses.device))

    def epoch_metrics(self) -> dict[str, float]:
        n_bias = self.data.n_bias
        out = {f"groupdro/q/{g // n_bias}_{g % n_bias}": float(w)
               for g, w in enumerate(self.weights.q)}
        out.update(getattr(self, "_mix", {}))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.weights.q.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights.q = state["q"].clone().double()
