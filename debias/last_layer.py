"""The last-layer trial: DFR-style retraining of the reference model's last layer on
validation images, shared by DFR (group-balanced subsets) and SLIM's ``last_layer`` mode
(curated subsets). The numerics are :mod:`debias.linear_heads`.

The procedure is the reference DFR code's (``dfr_evaluate_spurious.py``: tune, then eval):

1. **Tune.** Validation is cut in two (:meth:`Method.fit_halves`). Each point of the grid
   over C and class weights is fitted on subsets of the fit half (:meth:`Method.fit_subsets`;
   ``retrains`` of them, averaged, each standardised with its own statistics) and scored on
   the held-out half. Model selection picks the best point the way it picks the best epoch
   elsewhere (ties: the first point, the largest C).
2. **Final head** (``final_fit: all_val``, the reference's): the selected point refitted on
   subsets of the *whole* validation set (:meth:`Method.final_subsets`; ``final_retrains``
   of them, coefficients averaged), standardised with the statistics of all of validation;
   its test predictions are the trial's test metrics. ``final_fit: tuning`` keeps the
   selected tuning head instead (fitted on half as many images: this project's earlier rule).

Features are the reference trunk's raw penultimate (average-pooled) embeddings, as the
reference extracts them, and every head is folded back onto them: the checkpoint is the
reference trunk plus one linear layer. The trial speaks the trainable's protocol
(``epochs()``, ``epoch``, ``save``/``load``); a "step" is one grid point, reported to Ray
Tune and MLflow and checkpointed; the final fit happens within the last step. Everything
expensive (reference model, features, the method's subsets) comes from the stage cache.

Validation metrics (``val/*``) are those of the held-out half only: the fit half trained the
tuning heads and would flatter them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import field_validator

from debias.cache import CorruptFile, StageCache
from debias.data import GroupedDataset
from debias.engine import Selection, method_for, trial_device
from debias.linear_heads import LinearHead, class_weight_options, fit_averaged_head, standardiser
from debias.methods.base import Method
from debias.metrics import group_metrics
from debias.params import Choice, Floats, Int, Number, Section
from debias.seeding import derive_seed
from debias.stages import frozen_features, reference_key, reference_model
from debias.trial_config import Settings, TrialConfig

__all__ = ["LastLayerParams", "LastLayerTrial", "grid_size"]

DEFAULT_C_GRID = [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01]


class LastLayerParams(Section):
    """The grid and fits of a last-layer method (its section inherits these keys)."""

    retrains: int = Int(1, 1, 1000, doc="tuning fits averaged per grid point, each on its "
                                        "own subset of the fit half")
    final_fit: Literal["all_val", "tuning"] = Choice(
        "all_val", searchable=False,
        doc="all_val: refit the selected point on all of validation (the reference); "
            "tuning: keep the selected tuning head (fitted on half of validation)")
    final_retrains: int = Int(20, 1, 1000, searchable=False,
                              doc="fits averaged into the final head")
    c_grid: list[Number] = Floats(DEFAULT_C_GRID,
                                 expected="a non-empty list of distinct numbers > 0",
                                 doc="inverse L1 strengths tried (DFR's grid)")
    class_weight_ratios: list[Number] = Floats(
        [1.0], expected="a non-empty list of distinct numbers > 0",
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
    """One last-layer trial: the method's subsets, the grid one point a step, then the final
    head."""

    def __init__(self, config: Settings, method: type[Method],
                 device: str | None = None,
                 data: GroupedDataset | None = None) -> None:
        self.config = config = TrialConfig.of(config)
        self.seed = config.seed
        self.device = trial_device(device)
        self.data = data or config.load_data()
        self.cache = StageCache(config.cache_dir)
        self.method = method_for(method, config, self.data, self.cache, self.device)
        params = self.method.params
        assert isinstance(params, LastLayerParams), "a last-layer method's Params has the grid"
        self.params = params
        n_classes = self.data.n_classes

        before = StageCache.events()
        self.method.prepare()
        fit_half, self.held_out = self.method.fit_halves()
        subsets = self.method.fit_subsets(fit_half)
        ref_seed = self.method.reference_seed()
        features = frozen_features(config.with_seed(ref_seed), self.data, self.cache,
                                   self.device, "reference", splits=("val", "test"),
                                   normalize=False)
        # What this trial computed vs reused of the shared stages, reported with every step.
        self.cache_events = {k: float(v - before.get(k, 0))
                             for k, v in StageCache.events().items()}
        self.reference_key = reference_key(config, self.data, seed=ref_seed)
        self.reference = reference_model(config.with_seed(ref_seed), self.data, self.cache,
                                         self.device)
        self.stage_tags = self.cache.stage_tags()

        val = self.data.view("val")
        self.val_x = features["val"].numpy().astype(np.float64)
        ordered = [np.sort(positions) for positions in subsets]
        self.subsets = [(self.val_x[p], val.y[p]) for p in ordered]
        self.fitted = (np.concatenate([x for x, _ in self.subsets]),
                       np.concatenate([y for _, y in self.subsets]))
        self.features = {"val": self.val_x[self.held_out],
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
        self.selection = Selection(metric=config.selection.metric, mode=config.selection.mode)
        self.selected_head: LinearHead | None = None
        self.selected_point: int | None = None  # index into the grid
        self.final_report: dict[str, float] = {}
        self.epoch = 0  # grid points done

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        head = self.selected_head
        return {
            "epoch": self.epoch,
            "selection": self.selection.state_dict(),
            "reference_key": self.reference_key,
            "point": -1 if self.selected_point is None else self.selected_point,
            "head": None if head is None else {"weight": torch.from_numpy(head.weight),
                                               "bias": torch.from_numpy(head.bias)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["reference_key"] != self.reference_key:
            raise ValueError(f"checkpoint of a head on reference model {state['reference_key']}"
                             f", but this trial's reference model is {self.reference_key}")
        self.epoch = int(state["epoch"])
        self.selection.load_state_dict(state["selection"])
        point = int(state.get("point", -1))
        self.selected_point = None if point < 0 else point
        head = state["head"]
        self.selected_head = None if head is None else LinearHead(
            weight=head["weight"].numpy(), bias=head["bias"].numpy())

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def selected_model(self) -> dict[str, Any] | None:
        """The reference trunk with the selected (final, once the grid is done) head as its
        target head: a Classifier's state_dict on the trunk's raw features."""
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
        """Fit the remaining grid points, yielding each one's metrics; the last one's carry
        the final head's test metrics."""
        while self.epoch < len(self.grid):
            yield self.fit_step()

    def fit_step(self) -> dict[str, Any]:
        index = self.epoch
        c, weights = self.grid[index]
        head = fit_averaged_head(self.subsets, c, weights, self.data.n_classes,
                                 seed=derive_seed(self.seed, "last-layer", index))
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

        def remember() -> dict[str, float]:  # test waits for the final head
            self.selected_point, self.selected_head = index, head
            return {}

        metrics.update(self.selection.record(metrics, self.epoch, remember))
        if self.epoch == len(self.grid) and self.selected_point is not None:
            metrics.update(self.finish())
        return metrics

    def finish(self) -> dict[str, float]:
        """The final head of the selected grid point, its test metrics (the trial's) and
        what it was fitted on."""
        assert self.selected_point is not None
        c, weights = self.grid[self.selected_point]
        if self.params.final_fit == "all_val":
            val = self.data.view("val")
            final = [np.sort(p) for p in self.method.final_subsets()]
            self.selected_head = fit_averaged_head(
                [(self.val_x[p], val.y[p]) for p in final], c, weights, self.data.n_classes,
                seed=derive_seed(self.seed, "last-layer-final"),
                scaler=standardiser(self.val_x))
            counts = np.bincount(val.y[final[0]] * self.data.n_bias + val.a[final[0]],
                                 minlength=self.data.n_classes * self.data.n_bias)
            self.final_report = {
                "last_layer/final_fit_size": float(np.mean([len(p) for p in final])),
                "last_layer/final_retrains": float(len(final)),
                **{f"last_layer/final_fit_group/{g // self.data.n_bias}_"
                   f"{g % self.data.n_bias}": float(n) for g, n in enumerate(counts)}}
        else:
            self.final_report = {
                "last_layer/final_fit_size": self.first_report["last_layer/fitted_size"],
                "last_layer/final_retrains": float(len(self.subsets))}
        assert self.selected_head is not None
        self.selection.test = self.evaluate("test", self.selected_head)
        return {**self.final_report, **self.selection.test}

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
