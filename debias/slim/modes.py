"""What each SLIM retrain mode samples, curates and reports, shared by its two trials.

``full`` retraining (SGD epochs, :mod:`debias.engine`) works on the training split;
``last_layer`` retraining (a grid of logistic regressions, :mod:`debias.last_layer`) on the
fitted half of validation. Both get their reference model, curation, annotation request,
GradCAM examples and once-per-trial metrics from here, so the two modes cannot drift apart in
how they key the cache or what they log; the annotation page (``--annotate``) builds its
request here too.

Seeds. The reference model, the 2-D embedding, the sample shown to the annotator and the
validation halves come from the *sampling seed*; the curation's own picks from a seed derived
from the trial's. With a simulated annotator the sampling seed is the trial's seed, so each
reported seed re-runs everything. With a person's annotation file (``annotator: csv``) it is
the search's trial seed in every phase: a person annotates once, so the reported seeds vary
the curation and the retraining only (the report says so).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from debias.cache import StageCache, stage_key
from debias.data import GroupedDataset
from debias.files import atomic_dir
from debias.linear_heads import split_halves
from debias.models import Classifier
from debias.seeding import derive_seed
from debias.slim.pipeline import (
    GRADCAM_VERSION,
    SlimKnobs,
    attention_stage,
    curated_subset,
    request_rows,
    write_overlays,
)
from debias.stage_plan import StageRequest
from debias.stages import features_requests, reference_key, reference_model, reference_request
from debias.trial_config import Settings, TrialConfig

__all__ = ["MODE_SPLITS", "annotation_request_rows", "compute_gradcam", "curation",
           "curation_metrics", "gradcam_examples", "reference_for", "sampling_seed",
           "stage_requests", "validation_halves"]

#: The split each retrain mode samples, annotates and curates in.
MODE_SPLITS: dict[str, str] = {"full": "train", "last_layer": "val"}


def sampling_seed(config: TrialConfig, knobs: SlimKnobs) -> int:
    """The seed of what a person would see: the trial's, or with a person's file the
    search's in every phase (see the module docstring)."""
    return config.search_seed if knobs.annotator == "csv" else config.seed


def validation_halves(data: GroupedDataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) validation positions of last-layer mode, fixed by the sampling seed."""
    return split_halves(data.view("val").y, derive_seed(seed, "val-halves"))


def _curation_split(config: TrialConfig, knobs: SlimKnobs, data: GroupedDataset
                    ) -> tuple[str, np.ndarray | None]:
    """(split, pool) that SLIM samples and curates in: all of train for ``full``, the fit
    half of validation for ``last_layer``."""
    split = MODE_SPLITS[knobs.retrain]
    if split == "val":
        fit_half, _ = validation_halves(data, sampling_seed(config, knobs))
        return split, fit_half
    return split, None


def reference_for(config: TrialConfig, knobs: SlimKnobs, data: GroupedDataset,
                  cache: StageCache, device: torch.device) -> tuple[Classifier, str]:
    """(the cached ERM reference model, its cache key): what SLIM's stages are keyed on."""
    seed = sampling_seed(config, knobs)
    return (reference_model(config, data, cache, device, seed=seed),
            reference_key(config, data, seed=seed))


def curation(config: TrialConfig, knobs: SlimKnobs, data: GroupedDataset,
             cache: StageCache, device: torch.device, reference: tuple[Classifier, str],
             retrain_index: int = 0, oracle: Any = None) -> dict[str, Any]:
    """The curated subset for the trial's retrain mode and retrain ``retrain_index``."""
    model, ref_key = reference
    split, pool = _curation_split(config, knobs, data)
    seed = sampling_seed(config, knobs)
    return curated_subset(knobs, data, model, cache, device, model_key=ref_key, split=split,
                          pool=pool, seed=seed, oracle=oracle,
                          curation_seed=derive_seed(config.seed, "curation", retrain_index))


def annotation_request_rows(config: TrialConfig, knobs: SlimKnobs, data: GroupedDataset,
                            cache: StageCache, device: torch.device, path: Path
                            ) -> list[dict[str, Any]]:
    """The request rows for the config's retrain mode (overlays written beside ``path``)."""
    model, ref_key = reference_for(config, knobs, data, cache, device)
    split, pool = _curation_split(config, knobs, data)
    return request_rows(knobs, data, model, cache, device, ref_key, path, split, pool,
                        seed=sampling_seed(config, knobs))


def compute_gradcam(config: Settings, seed: int, split: str) -> None:
    """The stage task: GradCAM of ``split`` (the one the trial's retrain mode curates in) by
    the reference model of the sampling ``seed``."""
    from debias.engine import trial_device

    cfg = TrialConfig.of(config)
    data = cfg.load_data()
    cache, device = StageCache(cfg.cache_dir), trial_device(None)
    model = reference_model(cfg, data, cache, device, seed=seed)
    attention_stage(data, model, cache, device, reference_key(cfg, data, seed=seed), split)


def stage_requests(config: TrialConfig, knobs: SlimKnobs, data: GroupedDataset
                   ) -> list[StageRequest]:
    """What a SLIM trial reads that its planner computes first: the reference model (at the
    sampling seed), GradCAM over its split, and for last-layer mode the frozen features of
    validation and test (the curation, per trial knob, stays in the trial)."""
    seed = sampling_seed(config, knobs)
    ref = reference_request(config, data, seed=seed)
    split = MODE_SPLITS[knobs.retrain]
    gradcam = StageRequest("gradcam", stage_key("gradcam", GRADCAM_VERSION, {
        "data": data.identity(), "model": ref.key, "split": split}),
        "debias.slim.modes:compute_gradcam", dict(config.raw), {"seed": seed, "split": split},
        after=(ref.key,), work=(("backward", split, 1.0),))
    out = [ref, gradcam]
    if split == "val":
        out += [r for r in features_requests(config.with_seed(seed), data, "reference",
                                             ("val", "test"), normalize=False)
                if r.stage == "features"]
        out[-1] = dataclasses.replace(out[-1], after=(ref.key,))
    return out


def gradcam_examples(config: TrialConfig, data: GroupedDataset, reference: Classifier,
                     device: torch.device, ref_key: str, curation: dict[str, Any],
                     n: int = 8) -> Path:
    """Overlays of the first annotated images, written once per reference model and split,
    shared by every trial (a folder renamed into place, so never half-written)."""
    split = curation["split"]
    annotated = curation["annotated_positions"].numpy()[:n]
    digest = stage_key("gradcam_examples", 1, {"ref": ref_key, "split": split,
                                               "positions": annotated.tolist()})
    folder = Path(config.cache_dir) / "gradcam_examples" / digest
    if not folder.is_dir():
        with atomic_dir(folder) as staging:  # another trial's identical folder may win
            write_overlays(staging, data, reference, device, annotated, split)
    return folder


def _positive_share(labels: Any) -> float:
    answered = np.asarray(labels)
    answered = answered[answered >= 0]
    return float((answered == 1).mean()) if len(answered) else math.nan


def curation_metrics(curation: dict[str, Any], group_mix: dict[str, float],
                     positions: np.ndarray, overlays: Path) -> dict[str, Any]:
    """What the curation cost and produced, reported once per trial; ``group_mix`` is the
    curated set's groups from the bias audit (reporting only)."""
    out: dict[str, Any] = {
        # A folder, not a number: the tracker logs its PNGs as the run's artifacts.
        "artifacts/gradcam": str(overlays),
        "slim/annotated": float(curation["annotated"]),
        "slim/annotated_fraction": float(curation["annotated_fraction"]),
        "slim/propagated_kept": float(curation["propagated_kept"]),
        "slim/curated_size": float(len(positions)),
        "slim/simulated_annotator": float(bool(curation["simulated"])),
        # The share of answered images with attention on the object: near 0 or 1, the
        # answers carry little information for the propagation to spread.
        "slim/annotated_positive_share": _positive_share(curation["annotation_labels"]),
        **{f"slim/curated_group/{g}": n for g, n in group_mix.items()},
    }
    for key in ("aiou_mean", "aiou_mean_curated"):
        if not math.isnan(float(curation[key])):
            out[f"slim/{key}"] = float(curation[key])
    return out
