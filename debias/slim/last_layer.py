"""The trial of ``slim.retrain: last_layer``: DFR-style last-layer retraining on a curated
validation subset (ALGORITHMS.md, SLIM step 8b).

It speaks the trainable's protocol (``epochs()``, ``epoch``, ``save``/``load``), but a
"step" is one point of the grid over C and class weights instead of an SGD epoch: each is
reported to Ray Tune and MLflow, checkpointed, scored on the held-out half of validation, and
model selection picks the best point the way it picks the best epoch elsewhere (test metrics
come from the selected point). Everything expensive (reference model, GradCAM on
validation, frozen features, curations) comes from the stage cache, so a trial is a few
hundred small logistic regressions.

Validation metrics (``val/*``) are those of the held-out half only: the fit half trained the
head and would flatter it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import log_softmax

from debias.cache import StageCache
from debias.data import GroupedDataset, load_grouped
from debias.engine import Selection
from debias.metrics import group_metrics
from debias.seeding import derive_seed
from debias.slim.dfr import LinearHead, class_weight_options, fit_averaged_head, standardiser
from debias.slim.modes import (
    curation_for,
    curation_metrics,
    gradcam_examples,
    reference_for,
    validation_halves,
)
from debias.stages import frozen_features

__all__ = ["LastLayerTrial"]


class LastLayerTrial:
    """One last-layer trial: curated validation subsets, then the grid, one point a step."""

    def __init__(self, config: dict[str, Any], device: str | None = None,
                 data: GroupedDataset | None = None) -> None:
        self.config = config
        self.seed = int(config["seed"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.data = data or load_grouped(config["dataset"], config["target"], config["bias"])
        self.cache = StageCache(config["cache_dir"])
        params = config["slim"]
        n_classes = self.data.n_classes

        before = StageCache.events()
        reference, ref_key = reference_for(config, self.data, self.cache, self.device)
        curations = [curation_for(config, self.data, self.cache, self.device, retrain_index=r,
                                  reference=(reference, ref_key))[2]
                     for r in range(params["retrains"])]
        features = frozen_features(config, self.data, self.cache, self.device, "reference",
                                   splits=("val", "test"))
        overlays = gradcam_examples(config, self.data, reference, self.device, ref_key,
                                    curations[0])
        # What this trial computed vs reused of the shared stages, reported with every step.
        self.cache_events = {k: float(v - before.get(k, 0))
                             for k, v in StageCache.events().items()}

        self.curations = curations
        fit_half, self.held_out = validation_halves(self.data, params["seed"])
        val = self.data.view("val")
        val_x = features["val"].numpy().astype(np.float64)
        self.mean, self.std = standardiser(val_x[fit_half])
        self.subsets = [(val_x[np.sort(c["positions"].numpy())],
                         val.y[np.sort(c["positions"].numpy())]) for c in curations]
        self.fitted = (np.concatenate([x for x, _ in self.subsets]),
                       np.concatenate([y for _, y in self.subsets]))
        self.features = {"val": val_x[self.held_out],
                         "test": features["test"].numpy().astype(np.float64)}
        self.positions = {"val": self.held_out, "test": np.arange(len(self.data.view("test")))}
        self.grid = [(float(c), weights) for c in params["c_grid"]
                     for weights in class_weight_options(params["class_weight_ratios"],
                                                         n_classes)]
        self.first_report = {
            **curation_metrics(curations[0], self.data, np.sort(curations[0]["positions"]
                                                                .numpy()), overlays),
            "slim/retrains": float(len(curations)),
            "slim/val_fit_size": float(len(fit_half)),
            "slim/val_selection_size": float(len(self.held_out)),
            "slim/grid_size": float(len(self.grid)),
        }
        self.reference_key = ref_key
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

    def load(self, path: Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

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
            "slim/C": c,
            **{f"slim/class_weight/{k}": float(w) for k, w in weights.items()},
            "slim/nonzero_features": float(head.nonzero),
        }
        if self.epoch == 1:
            metrics.update(self.first_report)
        metrics.update(self.cache_events)
        metrics.update(self.evaluate("val", head))

        def evaluate_test() -> dict[str, float]:
            self.selected_head = head
            return self.evaluate("test", head)

        metrics.update(self.selection.record(metrics, self.epoch, evaluate_test))
        return metrics

    def _log_loss(self, head: LinearHead) -> float:
        """Mean cross-entropy of the averaged head on the subsets it was fitted on."""
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
