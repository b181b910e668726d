"""What each SLIM retrain mode samples, curates and reports, shared by its two trials.

``full`` retraining (:class:`debias.methods.slim.SLIM`, SGD epochs) works on the training
split; ``last_layer`` retraining (:class:`debias.slim.last_layer.LastLayerTrial`, a grid of
logistic regressions) on the fitted half of validation. Both get their reference model,
curation, annotation request, GradCAM examples and once-per-trial metrics from here, so the
two modes cannot drift apart in how they key the cache or what they log.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from debias.cache import StageCache, stage_key
from debias.data import GroupedDataset
from debias.files import atomic_dir
from debias.models import Classifier
from debias.seeding import derive_seed
from debias.slim.dfr import split_halves
from debias.slim.pipeline import curated_subset, request_rows, write_overlays
from debias.stages import reference_key, reference_model

__all__ = ["MODE_SPLITS", "annotation_request_rows", "curation_for", "curation_metrics",
           "gradcam_examples", "reference_for", "validation_halves"]


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


#: The split each retrain mode samples, annotates and curates in.
MODE_SPLITS: dict[str, str] = {"full": "train", "last_layer": "val"}


def _curation_split(config: dict[str, Any], data: GroupedDataset
                    ) -> tuple[str, np.ndarray | None]:
    """(split, pool) that SLIM samples and curates in: all of train for ``full``, the fit
    half of validation for ``last_layer``."""
    split = MODE_SPLITS[config["slim"]["retrain"]]
    if split == "val":
        fit_half, _ = validation_halves(data, config["slim"]["seed"])
        return split, fit_half
    return split, None


def reference_for(config: dict[str, Any], data: GroupedDataset, cache: StageCache,
                  device: torch.device) -> tuple[Classifier, str]:
    """(the cached ERM reference model, its cache key): what SLIM's stages are keyed on."""
    return reference_model(config, data, cache, device), reference_key(config, data)


def curation_for(config: dict[str, Any], data: GroupedDataset, cache: StageCache,
                 device: torch.device, retrain_index: int = 0,
                 reference: tuple[Classifier, str] | None = None
                 ) -> tuple[Classifier, str, dict[str, Any]]:
    """(reference model, its cache key, the curated subset) for the trial's retrain mode;
    ``reference`` (from :func:`reference_for`) saves reloading it per retrain.

    Which images are annotated depends on ``slim.seed`` only, never on the trial seed: a
    person answers once per sweep. In last-layer mode the curation's own picks are the
    trial's randomness: retrain r of trial seed s curates with a seed derived from (s, r).
    """
    params = config["slim"]
    model, ref_key = reference or reference_for(config, data, cache, device)
    settings = _pipeline_settings(params)
    split, pool = _curation_split(config, data)
    if split == "val":
        settings["curation_seed"] = derive_seed(params["seed"], config["seed"], "curation",
                                                retrain_index)
    curation = curated_subset({"slim": settings}, data, model, cache, device,
                              model_key=ref_key, split=split, pool=pool)
    return model, ref_key, curation


def annotation_request_rows(config: dict[str, Any], data: GroupedDataset, cache: StageCache,
                            device: torch.device, path: Path) -> list[dict[str, Any]]:
    """The request rows for the trial's retrain mode (overlays written beside ``path``)."""
    model, ref_key = reference_for(config, data, cache, device)
    split, pool = _curation_split(config, data)
    return request_rows({"slim": _pipeline_settings(config["slim"])}, data, model, cache,
                        device, ref_key, path, split, pool)


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
        with atomic_dir(folder) as staging:  # another trial's identical folder may win
            write_overlays(staging, data, reference, device, annotated, split)
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
