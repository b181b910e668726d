"""SLIM: GradCAM attention of an ERM reference model, a few attention annotations, label
propagation and a feature-balanced curated subset, then retraining (ALGORITHMS.md, "SLIM").

Everything up to the curated subset is cached (:mod:`debias.slim.pipeline`): a sweep over
retraining knobs (lr, weight decay, epochs, the last-layer grid) computes GradCAM and the
curation once. The trial is the retraining, in one of the spec's two modes:

- ``full`` (this class, through the shared SGD loop): a fresh model (the sweep's backbone and
  weights) trained on the curated *train* subset;
- ``last_layer`` (:class:`debias.slim.last_layer.LastLayerTrial`): DFR-style L1 logistic
  regression on the reference model's frozen features of a curated *validation* subset, over
  a grid of C and class weights, averaged over retrains; the other half of validation
  selects. :func:`curation_for` serves both, so the annotation request matches the mode.
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

from debias.cache import StageCache, stage_key
from debias.data import GroupedDataset
from debias.methods.base import Method
from debias.models import Classifier
from debias.seeding import derive_seed
from debias.slim.dfr import split_halves
from debias.slim.pipeline import curated_subset, request_rows, write_overlays
from debias.stages import reference_key, reference_model

__all__ = ["SLIM", "annotation_request_rows", "curation_for", "curation_metrics",
           "gradcam_examples", "validation_halves"]


def _pipeline_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The validated ``slim`` section in the pipeline's vocabulary."""
    return {
        "budget_per_class": params["budget_per_class"],
        "neighbours": params["neighbours"],
        "gamma": params["gamma"],
        "keep_quantile": params["keep_quantile"],
        "curated_size": params["curated_size"],
        "cell_share": params["cell_share"],
        "k_range": [2, params["k_max"]],
        "embedding": params["embedding"],
        "annotator": params["annotator"],
        "annotations": params.get("annotations"),
        "aiou_threshold": params["aiou_threshold"],
        "seed": params["seed"],
    }


def validation_halves(data: GroupedDataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) validation positions of last-layer mode, fixed by the SLIM seed."""
    return split_halves(data.view("val").y, seed)


def _curation_split(config: dict[str, Any], data: GroupedDataset
                    ) -> tuple[str, np.ndarray | None]:
    """(split, pool) that SLIM samples and curates in: all of train for ``full``, the fit
    half of validation for ``last_layer``."""
    if config["slim"]["retrain"] == "last_layer":
        fit_half, _ = validation_halves(data, config["slim"]["seed"])
        return "val", fit_half
    return "train", None


def curation_for(config: dict[str, Any], data: GroupedDataset, cache: StageCache,
                 device: torch.device, retrain_index: int = 0
                 ) -> tuple[Classifier, str, dict[str, Any]]:
    """(reference model, its cache key, the curated subset) for the trial's retrain mode.

    Which images are annotated depends on ``slim.seed`` only, never on the trial seed: a
    person answers once per sweep. In last-layer mode the curation's own picks are the
    trial's randomness: retrain r of trial seed s curates with a seed derived from (s, r).
    """
    params = config["slim"]
    reference = reference_model(config, data, cache, device)
    ref_key = reference_key(config, data)
    settings = _pipeline_settings(params)
    split, pool = _curation_split(config, data)
    if split == "val":
        settings["curation_seed"] = derive_seed(params["seed"], config["seed"], "curation",
                                                retrain_index)
    curation = curated_subset({"slim": settings}, data, reference, cache, device,
                              model_key=ref_key, split=split, pool=pool)
    return reference, ref_key, curation


def annotation_request_rows(config: dict[str, Any], data: GroupedDataset, cache: StageCache,
                            device: torch.device, path: Path) -> list[dict[str, Any]]:
    """The request rows for the trial's retrain mode (overlays written beside ``path``)."""
    reference = reference_model(config, data, cache, device)
    split, pool = _curation_split(config, data)
    return request_rows({"slim": _pipeline_settings(config["slim"])}, data, reference, cache,
                        device, reference_key(config, data), path, split, pool)


def gradcam_examples(config: dict[str, Any], data: GroupedDataset, reference: Classifier,
                     device: torch.device, ref_key: str, curation: dict[str, Any],
                     n: int = 8) -> Path:
    """Overlays of the first annotated images, written once per reference model and split,
    shared by every trial (a folder renamed into place, so never half-written)."""
    split = curation["split"]
    annotated = curation["annotated_positions"].numpy()[:n]
    digest = stage_key("gradcam_examples", 1, {"ref": ref_key, "split": split,
                                               "positions": annotated.tolist()})
    folder = Path(config["cache_dir"]) / "gradcam_examples" / digest
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        write_overlays(staging, data, reference, device, annotated, split)
        try:
            os.replace(staging, folder)
        except OSError:  # another trial renamed its identical folder first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def curation_metrics(curation: dict[str, Any], data: GroupedDataset, positions: np.ndarray,
                     overlays: Path) -> dict[str, Any]:
    """What the curation cost and produced, reported once per trial."""
    view = data.view(curation["split"])
    groups = np.bincount(view.group[positions], minlength=2 * data.n_classes)  # y * 2 + a
    out: dict[str, Any] = {
        # A folder, not a number: the tracker logs its PNGs as the run's artifacts.
        "artifacts/gradcam": str(overlays),
        "slim/annotated": float(curation["annotated"]),
        "slim/annotated_fraction": float(curation["annotated_fraction"]),
        "slim/propagated_kept": float(curation["propagated_kept"]),
        "slim/curated_size": float(len(positions)),
        "slim/simulated_annotator": float(bool(curation["simulated"])),
        # Group mix of the curated set (bias labels used for *reporting* only).
        **{f"slim/curated_group/{g // 2}_{g % 2}": float(n)
           for g, n in enumerate(groups)},
    }
    for key in ("aiou_mean", "aiou_mean_curated"):
        if not math.isnan(float(curation[key])):
            out[f"slim/{key}"] = float(curation[key])
    return out


class SLIM(Method):
    """Full retraining on the curated training subset (``slim.retrain: full``)."""

    name = "slim"

    def prepare(self) -> None:
        if self.params["retrain"] != "full":
            raise ValueError("slim.retrain 'last_layer' is not trained by SGD epochs: build the "
                             "trial with debias.trainable.build_trial (LastLayerTrial)")
        self.reference, ref_key, self.curation = curation_for(self.config, self.data,
                                                              self.cache, self.device)
        self.positions = np.sort(self.curation["positions"].numpy())
        self.overlays = gradcam_examples(self.config, self.data, self.reference, self.device,
                                         ref_key, self.curation)
        self._first_epoch = True

    def train_positions(self) -> np.ndarray:
        return self.positions

    def loss(self, model: Classifier, images: torch.Tensor, positions: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(images), labels)

    def epoch_metrics(self) -> dict[str, Any]:
        if not self._first_epoch:
            return {}
        self._first_epoch = False
        return curation_metrics(self.curation, self.data, self.positions, self.overlays)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
        self._first_epoch = False
