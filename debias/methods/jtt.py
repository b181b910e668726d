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

from debias.cache import StageCache, stage_key
from debias.data import GroupedDataset
from debias.methods.base import Method
from debias.params import Int, Section
from debias.stage_plan import StageRequest
from debias.stages import predict, reference_key, reference_model, reference_request

__all__ = ["JTT", "JTTParams", "compute_errors", "error_set", "upsampled_positions"]

ERRORS_VERSION = 1


class JTTParams(Section):
    epochs_id: int = Int(2, 1, 10_000, doc="T: epochs of the ERM identification model")
    lambda_up: int = Int(5, 1, 100_000, doc="λ_up: copies of each error-set example")


def upsampled_positions(n: int, errors: np.ndarray, lambda_up: int) -> np.ndarray:
    """Every training position once, plus each error position λ_up - 1 more times."""
    return np.concatenate([np.arange(n), np.repeat(np.flatnonzero(errors), lambda_up - 1)])


def errors_inputs(config: dict[str, Any], data: GroupedDataset, epochs: int) -> dict[str, Any]:
    return {"reference": reference_key(config, data, epochs=epochs)}


def error_set(config: dict[str, Any], data: GroupedDataset, cache: StageCache,
              device: torch.device, epochs: int) -> np.ndarray:
    """The training examples the identification model (ERM after ``epochs``) gets wrong."""

    def identify() -> dict[str, torch.Tensor]:
        model = reference_model(config, data, cache, device, epochs=epochs)
        preds = predict(model, data, "train", device, config["train"]["eval_batch_size"])
        return {"errors": preds != torch.from_numpy(np.array(data.view("train").y))}

    return cache.get_or_compute("jtt_errors", ERRORS_VERSION,
                                errors_inputs(config, data, epochs), identify)["errors"].numpy()


def compute_errors(config: dict[str, Any], epochs: int) -> None:
    """The stage task: the identification model, then its error set, into the cache."""
    from debias.data import load_grouped
    from debias.engine import trial_device

    data = load_grouped(config["dataset"], config["target"], config["bias"])
    error_set(config, data, StageCache(config["cache_dir"]), trial_device(None), epochs)


class JTT(Method):
    #: The reference code trains without augmentation unless asked (docs/methods.md).
    reference_augments = False
    name = "jtt"
    section = "jtt"
    Params = JTTParams
    summary = "upweight what a briefly trained ERM model gets wrong (no bias labels)"

    @classmethod
    def shared_stages(cls, config: dict[str, Any], data: GroupedDataset) -> list[StageRequest]:
        epochs = cls.params_of(config).epochs_id
        ref = reference_request(config, data, epochs=epochs)
        errors = StageRequest("jtt_errors", stage_key("jtt_errors", ERRORS_VERSION,
                                                      errors_inputs(config, data, epochs)),
                              "debias.methods.jtt:compute_errors", config, {"epochs": epochs},
                              after=(ref.key,))
        return [ref, errors]

    def prepare(self) -> None:
        p = self.params
        self.errors = error_set(self.config, self.data, self.cache, self.device, p.epochs_id)
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
