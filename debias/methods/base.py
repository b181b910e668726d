"""The one interface every debiasing method implements.

A method is four small decisions on top of a shared training loop: which shared stages it
prepares (cached, so trials reuse them), which heads its model has, the loss of a batch, and
what it reports per epoch. Everything else (data order, seeding, evaluation, checkpoints,
reporting) lives in :mod:`debias.engine`, so ERM, ClusterFix and SLIM differ only where their
papers differ.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from debias.cache import StageCache
from debias.data import GroupedDataset
from debias.models import Classifier

__all__ = ["Method"]


class Method:
    """Base class: ERM's behaviour, overridden piecewise by other methods."""

    name: ClassVar[str]

    def __init__(self, config: dict[str, Any], data: GroupedDataset, cache: StageCache,
                 device: torch.device) -> None:
        self.config = config
        self.params: dict[str, Any] = config.get(self.name, {})
        self.data = data
        self.cache = cache
        self.device = device

    def prepare(self) -> None:
        """Compute or fetch the shared stages this method needs (no-op for ERM)."""

    def heads(self) -> dict[str, int]:
        return {"target": self.data.n_classes}

    def setup_model(self, model: Classifier) -> None:
        """Adjust a freshly built model before its optimiser exists (e.g. load and freeze a
        trunk); parameters left with requires_grad=False are not optimised."""
        del model

    def train_positions(self) -> np.ndarray:
        """Positions of the training split this trial trains on (SLIM narrows it)."""
        return np.arange(len(self.data.view("train")))

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(images), labels)

    def epoch_metrics(self) -> dict[str, float]:
        """Method-specific numbers for this epoch, named `{method}/...`."""
        return {}

    def eval_metrics(self, split: str, preds: np.ndarray) -> dict[str, float]:
        """Extra metrics of a split's predictions, named `{split}/...` (none for ERM)."""
        del split, preds
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Per-trial state that must survive a retry (tensors and plain Python only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
