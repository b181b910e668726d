"""SLIM: GradCAM attention of an ERM reference model, a few attention annotations, label
propagation and a feature-balanced curated subset, then retraining (ALGORITHMS.md, "SLIM").

Everything up to the curated subset is cached (:mod:`debias.slim.pipeline`): a sweep over
retraining knobs (lr, weight decay, epochs, retrain mode) computes GradCAM and the curation
once. The trial is the retraining, in one of two modes:

- ``full``: a fresh model (the sweep's backbone and weights) trained on the curated subset;
- ``last_layer``: the reference model's trunk, frozen (BatchNorm statistics included), with a
  new target head trained on the curated subset. The original fits an L1 logistic regression
  on a curated *validation* subset (DFR); here the head is trained by the shared loop on the
  curated *train* subset, so validation stays untouched for model selection.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from debias.cache import stage_key
from debias.methods.base import Method
from debias.models import Classifier
from debias.slim.pipeline import curated_subset, write_overlays
from debias.stages import reference_key, reference_model

__all__ = ["SLIM"]


class SLIM(Method):
    name = "slim"

    def prepare(self) -> None:
        p = self.params
        self.reference = reference_model(self.config, self.data, self.cache, self.device)
        ref_key = reference_key(self.config, self.data)
        settings = {
            "budget_per_class": p["budget_per_class"],
            "neighbours": p["neighbours"],
            "gamma": p["gamma"],
            "keep_quantile": p["keep_quantile"],
            "curated_size": p["curated_size"],
            "cell_share": p["cell_share"],
            "k_range": [2, p["k_max"]],
            "embedding": p["embedding"],
            "annotator": p["annotator"],
            "annotations": p.get("annotations"),
            "aiou_threshold": p["aiou_threshold"],
            "seed": p["seed"],
        }
        self.curation = curated_subset({"slim": settings}, self.data, self.reference, self.cache,
                                       self.device, model_key=ref_key)
        self.positions = np.sort(self.curation["positions"].numpy())
        self.overlays = self._gradcam_examples(ref_key)
        self._first_epoch = True

    def _gradcam_examples(self, ref_key: str, n: int = 8) -> Path:
        """Overlays of the first annotated images, written once per reference model and
        shared by every trial (a folder renamed into place, so never half-written)."""
        annotated = self.curation["annotated_positions"].numpy()[:n]
        digest = stage_key("gradcam_examples", 1, {"ref": ref_key,
                                                   "positions": annotated.tolist()})
        folder = Path(self.config["cache_dir"]) / "gradcam_examples" / digest
        if not folder.is_dir():
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
            write_overlays(staging, self.data, self.reference, self.device, annotated)
            try:
                os.replace(staging, folder)
            except OSError:  # another trial renamed its identical folder first
                shutil.rmtree(staging, ignore_errors=True)
        return folder

    def setup_model(self, model: Classifier) -> None:
        if self.params["retrain"] != "last_layer":
            return
        trunk_state = {k: v for k, v in self.reference.trunk.state_dict().items()}
        model.trunk.load_state_dict(trunk_state)
        for param in model.trunk.parameters():
            param.requires_grad_(False)

    def train_positions(self) -> np.ndarray:
        return self.positions

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        if self.params["retrain"] == "last_layer":
            model.trunk.eval()  # frozen means frozen: no BatchNorm statistics drift either
        return F.cross_entropy(model(images), labels)

    def epoch_metrics(self) -> dict[str, Any]:
        if not self._first_epoch:
            return {}
        self._first_epoch = False
        c = self.curation
        view = self.data.view("train")
        curated_groups = np.bincount(view.group[self.positions], minlength=4)
        out: dict[str, Any] = {
            # A folder, not a number: the tracker logs its PNGs as the run's artifacts.
            "artifacts/gradcam": str(self.overlays),
            "slim/annotated": float(c["annotated"]),
            "slim/annotated_fraction": float(c["annotated_fraction"]),
            "slim/propagated_kept": float(c["propagated_kept"]),
            "slim/curated_size": float(len(self.positions)),
            "slim/simulated_annotator": float(bool(c["simulated"])),
            # Group mix of the curated set (bias labels used for *reporting* only).
            **{f"slim/curated_group/{g // 2}_{g % 2}": float(n)
               for g, n in enumerate(curated_groups)},
        }
        for key in ("aiou_mean", "aiou_mean_curated"):
            if not math.isnan(float(c[key])):
                out[f"slim/{key}"] = float(c[key])
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
        self._first_epoch = False
