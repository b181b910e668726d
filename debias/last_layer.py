"""The last-layer trial: DFR-style retraining of the reference model's last layer on subsets
of one half of validation, shared by DFR (group-balanced subsets) and SLIM's ``last_layer``
mode (curated subsets). The numerics are :mod:`debias.linear_heads`.

It speaks the trainable's protocol (``epochs()``, ``epoch``, ``save``/``load``), but a
"step" is one point of the grid over C and class weights instead of an SGD epoch: each is
reported to Ray Tune and MLflow, checkpointed, scored on the held-out half of validation, and
model selection picks the best point the way it picks the best epoch elsewhere (test metrics
come from the selected point). Everything expensive (reference model, frozen features, the
method's subsets) comes from the stage cache, so a trial is a few hundred small logistic
regressions.

Validation metrics (``val/*``) are those of the held-out half only: the fit half trained the
head and would flatter it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import field_validator

from debias.cache import CorruptFile, StageCache
from debias.data import GroupedDataset, load_grouped
from debias.engine import Selection, method_for, trial_device
from debias.linear_heads import LinearHead, class_weight_options, fit_averaged_head, standardiser
from debias.methods.base import Method
from debias.metrics import group_metrics
from debias.params import Floats, Int, Number, Section
from debias.seeding import derive_seed
from debias.stages import frozen_features, reference_key, reference_model

__all__ = ["LastLayerParams", "LastLayerTrial", "grid_size"]

DEFAULT_C_GRID = [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]


class LastLayerParams(Section):
    """The grid of a last-layer method (its section inherits these keys)."""

    retrains: int = Int(5, 1, 1000, doc="fits averaged per grid point, each on its own subset")
    c_grid: list[Number] = Floats(DEFAULT_C_GRID,
                                 expected="a non-empty list of distinct numbers > 0",
                                 doc="inverse L1 strengths tried (DFR's grid)")
    class_weight_ratios: list[Number] = Floats(
        [1.0, 2.0, 3.0, 10.0], expected="a non-empty list of distinct numbers > 0",
        doc="class weights tried: {0: 1, 1: w} and {0: w, 1: 1} for each w")

    @field_validator("c_grid", "class_weight_ratios")
    @classmethod
    def _distinct_positive(cls, values: list[float]) -> list[float]:
        if len(set(values)) != len(values) or any(not v > 0 for v in values):
            raise ValueError("needs distinct numbers > 0")
        return values


def grid_size(params: LastLayerParams, n_classes: int = 2) -> int:
    return len(params.c_grid) * len(class_weight_options(params.class_weight_ratios, n_classes))


class LastLayerTrial:
    """One last-layer trial: the method's fitted subsets, then the grid, one point a step."""

    def __init__(self, config: dict[str, Any], method: type[Method], device: str | None = None,
                 data: GroupedDataset | None = None) -> None:
        self.config = config
        self.seed = int(config["seed"])
        self.device = trial_device(device)
        self.data = data or load_grouped(config["dataset"], config["target"], config["bias"])
        self.cache = StageCache(config["cache_dir"])
        self.method = method_for(method, config, self.data, self.cache, self.device)
        params = self.method.params
        assert isinstance(params, LastLayerParams), "a last-layer method's Params has the grid"
        n_classes = self.data.n_classes

        before = StageCache.events()
        self.method.prepare()
        fit_half, self.held_out = self.method.fit_halves()
        subsets = self.method.fit_subsets(fit_half)
        ref_seed = self.method.reference_seed()
        features = frozen_features({**config, "seed": ref_seed}, self.data, self.cache,
                                   self.device, "reference", splits=("val", "test"))
        # What this trial computed vs reused of the shared stages, reported with every step.
        self.cache_events = {k: float(v - before.get(k, 0))
                             for k, v in StageCache.events().items()}
        self.reference_key = reference_key(config, self.data, seed=ref_seed)
        self.reference = reference_model({**config, "seed": ref_seed}, self.data, self.cache,
                                         self.device)
        self.stage_tags = self.cache.stage_tags()

        val = self.data.view("val")
        val_x = features["val"].numpy().astype(np.float64)
        self.mean, self.std = standardiser(val_x[fit_half])
        ordered = [np.sort(positions) for positions in subsets]
        self.subsets = [(val_x[p], val.y[p]) for p in ordered]
        self.fitted = (np.concatenate([x for x, _ in self.subsets]),
                       np.concatenate([y for _, y in self.subsets]))
        self.features = {"val": val_x[self.held_out],
                         "test": features["test"].numpy().astype(np.float64)}
        self.positions = {"val": self.held_out, "test": np.arange(len(self.data.view("test")))}
        self.grid = [(float(c), weights) for c in params.c_grid
                     for weights in class_weight_options(params.class_weight_ratios, n_classes)]
        self.first_report = {
            **self.method.fit_report(),
            "last_layer/retrains": float(len(subsets)),
            "last_layer/val_fit_size": float(len(fit_half)),
            "last_layer/val_selection_size": float(len(self.held_out)),
            "last_layer/fitted_size": float(np.mean([len(p) for p in ordered])),
            "last_layer/grid_size": float(len(self.grid)),
        }
        self.train_mix = self.data.group_counts("train")
        sel = config["selection"]
        self.selection = Selection(metric=sel["metric"], mode=sel["mode"])
        self.selected_head: LinearHead | None = None
        self.epoch = 0  # grid points done

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        head = self.selected_head
        return {
            "epoch": self.epoch,
            "selection": self.selection.state_dict(),
            "reference_key": self.reference_key,
            "head": None if head is None else {"weight": torch.from_numpy(head.weight),
                                               "bias": torch.from_numpy(head.bias)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["reference_key"] != self.reference_key:
            raise ValueError(f"checkpoint of a head on reference model {state['reference_key']}"
                             f", but this trial's reference model is {self.reference_key}")
        self.epoch = int(state["epoch"])
        self.selection.load_state_dict(state["selection"])
        head = state["head"]
        self.selected_head = None if head is None else LinearHead(
            weight=head["weight"].numpy(), bias=head["bias"].numpy())

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def selected_model(self) -> dict[str, Any] | None:
        """The reference trunk with the selected head as its target head: a Classifier's
        state_dict, on L2-normalised features (``config.yaml`` names the trial kind)."""
        if self.selected_head is None:
            return None
        state = {k: v.detach().cpu().clone() for k, v in self.reference.state_dict().items()
                 if not k.startswith("heads.")}
        # float64, as fitted: the exported head then predicts exactly what the trial scored.
        state["heads.target.weight"] = torch.from_numpy(self.selected_head.weight)
        state["heads.target.bias"] = torch.from_numpy(self.selected_head.bias)
        return state

    def load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CorruptFile(f"checkpoint {path} does not load ({type(exc).__name__}: "
                              f"{exc}); delete the trial's folder to start it afresh") from exc
        self.load_state_dict(state)

    # ------------------------------------------------------------------ the grid

    def epochs(self) -> Iterator[dict[str, Any]]:
        """Fit the remaining grid points, yielding each one's metrics."""
        while self.epoch < len(self.grid):
            yield self.fit_step()

    def fit_step(self) -> dict[str, Any]:
        c, weights = self.grid[self.epoch]
        head = fit_averaged_head(self.subsets, c, weights, self.data.n_classes, self.mean,
                                 self.std, seed=derive_seed(self.seed, "dfr", self.epoch))
        self.epoch += 1
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "train/loss": self._log_loss(head),
            "last_layer/C": c,
            **{f"last_layer/class_weight/{k}": float(w) for k, w in weights.items()},
            "last_layer/nonzero_features": float(head.nonzero),
        }
        if self.epoch == 1:
            metrics.update(self.first_report)
        metrics.update(self.cache_events)
        metrics.update(self.stage_tags)
        metrics.update(self.evaluate("val", head))

        def evaluate_test() -> dict[str, float]:
            self.selected_head = head
            return self.evaluate("test", head)

        metrics.update(self.selection.record(metrics, self.epoch, evaluate_test))
        return metrics

    def _log_loss(self, head: LinearHead) -> float:
        """Mean cross-entropy of the averaged head on the subsets it was fitted on."""
        from scipy.special import log_softmax

        x, y = self.fitted
        log_p = log_softmax(head.logits(x), axis=1)
        return float(-log_p[np.arange(len(y)), y].mean())

    def evaluate(self, split: str, head: LinearHead) -> dict[str, float]:
        """Group metrics of ``split`` (validation: the held-out half), flat and prefixed."""
        view = self.data.view(split)
        positions = self.positions[split]
        preds = head.predict(self.features[split])
        return group_metrics(preds, view.y[positions], view.a[positions],
                             n_classes=self.data.n_classes, n_bias=self.data.n_bias,
                             train_group_mix=self.train_mix).as_flat(split)
