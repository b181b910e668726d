"""JTT, "Just Train Twice" (Liu et al., "Just Train Twice: Improving Group Robustness without
Training Group Information", ICML 2021, Algorithm 1).

1. An identification model: ERM with the sweep's fixed ``reference`` settings, and the error
   set E of the training examples it misclassifies, as the reference code
   (anniesch/jtt) takes it: ``process_training.py --final_epoch T`` reads the predictions its
   ``train.py`` wrote *during the training pass* of (0-based) epoch T, in train mode
   (BatchNorm on batch statistics), each batch predicted just before its optimiser step, on
   unaugmented images. So ``jtt.epochs_id`` = T (the paper's 60 on Waterbirds, 1 on CelebA):
   T full epochs, then E from the predictions of pass T + 1
   (``jtt.error_predictions: training_pass``, the default). ``eval_after`` instead predicts
   in eval mode after T epochs with the cached reference model stopped at T (this project's
   earlier rule). E is a cached stage keyed by T, the rule and the trial's seed: every
   search trial with the same T shares it and each reported seed re-trains it.
2. The trial: a fresh model trained on the training set plus λ_up more copies of E
   (``ConcatDataset([train, Subset(train, E * λ_up)])`` in the reference: every error example
   λ_up + 1 times; ``jtt.lambda_up``, the paper's 100 on Waterbirds, 50 on CelebA): an epoch
   is one pass over the upsampled set, in a new random order each epoch, without augmentation.

No training bias labels are read; the paper selects T, λ_up and the rest by validation
worst-group accuracy, which does read validation bias labels (the report says which rule
selected).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from debias.cache import StageCache, stage_key
from debias.data import GroupedDataset
from debias.methods.base import Method
from debias.methods.erm import ERM
from debias.models import Classifier
from debias.params import Choice, Int, Section
from debias.stage_plan import StageRequest
from debias.stages import (
    predict,
    reference_config,
    reference_inputs,
    reference_key,
    reference_model,
    reference_request,
)
from debias.trial_config import Settings, TrialConfig

__all__ = ["JTT", "JTTParams", "compute_errors", "error_set", "upsampled_positions"]

ERRORS_VERSION = 2  # 2: predictions of the training pass after T epochs, by default

#: How the error set is read off the identification model (see the module docstring).
ERROR_PREDICTIONS = ("training_pass", "eval_after")


class JTTParams(Section):
    epochs_id: int = Int(2, 1, 10_000, doc="T: full epochs of the ERM identification model "
                                            "before its errors are read (the reference's "
                                            "--final_epoch)")
    lambda_up: int = Int(5, 1, 100_000, doc="λ_up: extra copies of each error-set example "
                                            "(each appears λ_up + 1 times)")
    error_predictions: Literal["training_pass", "eval_after"] = Choice(
        "training_pass", doc="training_pass: train-mode predictions during pass T + 1, as "
                             "the reference; eval_after: eval-mode predictions after T epochs")


def upsampled_positions(n: int, errors: np.ndarray, lambda_up: int) -> np.ndarray:
    """Every training position once, plus λ_up more copies of each error position."""
    return np.concatenate([np.arange(n), np.repeat(np.flatnonzero(errors), lambda_up)])


class RecordingERM(ERM):
    """ERM that, once asked to, keeps the train-mode prediction of every example it trains
    on (before that batch's optimiser step): JTT's identification pass."""

    def prepare(self) -> None:
        super().prepare()
        self.recording = False
        self.preds = np.full(len(self.data.view("train")), -1, dtype=np.int64)

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        logits = model(images)
        if self.recording:
            self.preds[positions.numpy()] = logits.detach().argmax(1).cpu().numpy()
        return F.cross_entropy(logits, labels)


def errors_inputs(config: TrialConfig, data: GroupedDataset, params: JTTParams
                  ) -> dict[str, Any]:
    if params.error_predictions == "eval_after":
        return {"reference": reference_key(config, data, epochs=params.epochs_id)}
    return {"identification": reference_inputs(config, data, epochs=params.epochs_id),
            "predictions": params.error_predictions}


def training_pass_errors(config: TrialConfig, data: GroupedDataset, device: torch.device,
                         epochs: int) -> torch.Tensor:
    """ERM with the ``reference`` settings for ``epochs`` full epochs, then the examples it
    misclassifies during the next training pass (train mode, before each batch's step)."""
    from debias.engine import Trainer

    ref_cfg = reference_config(config, epochs=epochs + 1)
    # The reference trains both of JTT's stages without augmentation.
    ref_cfg["train"] = {**ref_cfg["train"], "augment": "off"}
    trainer = Trainer(ref_cfg, RecordingERM, device=str(device), data=data)
    method = trainer.method
    assert isinstance(method, RecordingERM)
    for _ in range(epochs):
        trainer.train_one_epoch()
    method.recording = True
    trainer.train_one_epoch()
    assert (method.preds >= 0).all(), "an example was not seen in the identification pass"
    return torch.from_numpy(method.preds != np.asarray(data.view("train").y))


def error_set(config: TrialConfig, data: GroupedDataset, cache: StageCache,
              device: torch.device, params: JTTParams) -> np.ndarray:
    """The training examples the identification model gets wrong (a cached stage)."""

    def identify() -> dict[str, torch.Tensor]:
        if params.error_predictions == "training_pass":
            return {"errors": training_pass_errors(config, data, device, params.epochs_id)}
        model = reference_model(config, data, cache, device, epochs=params.epochs_id)
        preds = predict(model, data, "train", device, config.train.eval_batch_size)
        return {"errors": preds != torch.from_numpy(np.array(data.view("train").y))}

    return cache.get_or_compute("jtt_errors", ERRORS_VERSION,
                                errors_inputs(config, data, params), identify)["errors"].numpy()


def compute_errors(config: Settings) -> None:
    """The stage task: the identification model, then its error set, into the cache."""
    from debias.engine import trial_device

    cfg = TrialConfig.of(config)
    params = JTT.params_of(cfg)
    assert isinstance(params, JTTParams)
    error_set(cfg, cfg.load_data(), StageCache(cfg.cache_dir), trial_device(None), params)


class JTT(Method):
    #: The reference code trains without augmentation unless asked (docs/methods.md).
    reference_augments = False
    name = "jtt"
    section = "jtt"
    Params = JTTParams
    summary = "upweight what a briefly trained ERM model gets wrong (no bias labels)"

    @classmethod
    def shared_stages(cls, config: TrialConfig, data: GroupedDataset) -> list[StageRequest]:
        params = cls.params_of(config)
        assert isinstance(params, JTTParams)
        errors = StageRequest("jtt_errors", stage_key("jtt_errors", ERRORS_VERSION,
                                                      errors_inputs(config, data, params)),
                              "debias.methods.jtt:compute_errors", dict(config.raw),
                              work=(("train", "train", float(params.epochs_id)),
                                    ("eval", "train", 1.0)))
        if params.error_predictions == "training_pass":
            return [errors]  # the stage trains its own identification model
        ref = reference_request(config, data, epochs=params.epochs_id)
        return [ref, dataclasses.replace(errors, after=(ref.key,), work=(("eval", "train", 1.0),))]

    def prepare(self) -> None:
        p = self.params
        assert isinstance(p, JTTParams)
        self.errors = error_set(self.config, self.data, self.cache, self.device, p)
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
