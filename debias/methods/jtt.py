"""JTT, "Just Train Twice" (Liu et al., "Just Train Twice: Improving Group Robustness without
Training Group Information", ICML 2021, Algorithm 1).

1. An identification model: ERM trained for T epochs (``jtt.epochs_id``; the paper's T is 60
   on Waterbirds and 1 on CelebA) with the sweep's fixed ``reference`` settings. It is the
   reference-model stage stopped at T epochs, cached and keyed by T and the trial's seed, so
   every search trial with the same T shares it and each reported seed re-trains it.
2. The error set E: the training examples it misclassifies (a cached stage too).
3. The trial: a fresh model trained on the training set with every example of E repeated
   λ_up times (``jtt.lambda_up``; the paper's 100 on Waterbirds, 50 on CelebA): an epoch is
   one pass over the upsampled set, in a new random order each epoch.

No training bias labels are read; the paper selects T, λ_up and the rest by validation
worst-group accuracy, which does read validation bias labels (the report says which rule
selected).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from debias.methods.base import Method
from debias.params import Int, Section
from debias.stages import predict, reference_key, reference_model

__all__ = ["JTT", "JTTParams", "upsampled_positions"]

ERRORS_VERSION = 1


class JTTParams(Section):
    epochs_id: int = Int(2, 1, 10_000, doc="T: epochs of the ERM identification model")
    lambda_up: int = Int(5, 1, 100_000, doc="λ_up: copies of each error-set example")


def upsampled_positions(n: int, errors: np.ndarray, lambda_up: int) -> np.ndarray:
    """Every training position once, plus each error position λ_up - 1 more times."""
    return np.concatenate([np.arange(n), np.repeat(np.flatnonzero(errors), lambda_up - 1)])


class JTT(Method):
    name = "jtt"
    section = "jtt"
    Params = JTTParams
    summary = "upweight what a briefly trained ERM model gets wrong (no bias labels)"

    def prepare(self) -> None:
        p = self.params
        ref_key = reference_key(self.config, self.data, epochs=p.epochs_id)

        def identify() -> dict[str, torch.Tensor]:
            model = reference_model(self.config, self.data, self.cache, self.device,
                                    epochs=p.epochs_id)
            preds = predict(model, self.data, "train", self.device,
                            self.config["train"]["eval_batch_size"])
            return {"errors": preds != torch.as_tensor(self.data.view("train").y)}

        inputs = {"reference": ref_key}
        self.errors = self.cache.get_or_compute("jtt_errors", ERRORS_VERSION, inputs,
                                                identify)["errors"].numpy()
        self.positions = upsampled_positions(len(self.errors), self.errors, p.lambda_up)
        self._first_epoch = True

    def train_positions(self) -> np.ndarray:
        return self.positions

    def epoch_metrics(self) -> dict[str, Any]:
        if not self._first_epoch:
            return {}
        self._first_epoch = False
        errors = np.flatnonzero(self.errors)
        out = {"jtt/error_set_size": float(len(errors)),
               "jtt/error_rate": float(self.errors.mean()),
               "jtt/upsampled_size": float(len(self.positions))}
        # Which groups the error set holds (reporting only: the labels stay hidden).
        out.update({f"jtt/error_group/{g}": n
                    for g, n in self.audit.group_mix("train", errors).items()})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
        self._first_epoch = False
