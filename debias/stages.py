"""Shared stages that several methods build on: the ERM reference model and frozen features.

Both are pure functions of (dataset view, backbone, stage settings, seed), stored in the stage
cache so the first trial that needs one computes it and every later trial, on any node, loads
it. The searched trial knobs (lr, k, momentum) are deliberately *not* part of their keys: a
sweep over those knobs shares one reference model and one feature matrix. The seed is: every
search trial trains with the search's seed (so they share), while each reported seed re-trains
its own reference model, so the spread over seeds includes the reference's randomness.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from debias.bars import bars_disabled
from debias.cache import StageCache, stage_key
from debias.data import GroupedDataset, make_torch_dataset
from debias.data.grouped import SPLITS
from debias.engine import Trainer, predict_classes
from debias.methods.erm import ERM
from debias.models import Classifier, build_classifier
from debias.stage_plan import StageRequest
from debias.trial_config import Settings, TrialConfig

__all__ = ["backbone_identity", "compute_features", "compute_reference", "extract_features",
           "features_key", "features_requests", "frozen_features", "predict",
           "reference_config", "reference_inputs", "reference_key", "reference_model",
           "reference_request"]

REFERENCE_VERSION = 1
FEATURES_VERSION = 1


def backbone_identity(backbone: dict[str, Any]) -> dict[str, Any]:
    """Arch plus weights; a weights *file* is identified by its content, not its path."""
    weights = backbone["weights"]
    if weights not in ("none", "imagenet"):
        stat = Path(weights).stat()
        weights = f"sha256:{_file_digest(weights, stat.st_size, stat.st_mtime_ns)}"
    return {"arch": backbone["arch"], "weights": weights}


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Hash a weights file once per process (a ResNet-50 is ~100 MB), not once per trial
    that asks; size and mtime in the key make a replaced file hash again."""
    del size, mtime_ns
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def reference_config(config: Settings, seed: int | None = None,
                     epochs: int | None = None) -> dict[str, Any]:
    """The ERM trial config that trains the reference model: the sweep's dataset, target and
    backbone with the fixed `reference` settings (never the searched `train` values), the
    trial's seed unless ``seed`` says otherwise, and `reference.epochs` unless ``epochs`` does
    (JTT's identification model is the same ERM stopped after T epochs)."""
    cfg = TrialConfig.of(config)
    ref = cfg.reference.model_dump()
    if epochs is not None:
        ref["epochs"] = epochs
    return {
        "method": "erm",
        "dataset": cfg.dataset.model_dump(),
        "target": cfg.target,
        "bias": cfg.bias,
        "seed": cfg.seed if seed is None else seed,
        "backbone": cfg.backbone.model_dump(),
        "train": {**cfg.train.model_dump(), **ref},
        "erm": {"balance": "none"},
        # Bias labels never select the reference model: it is the last epoch.
        "selection": {"metric": "val/avg_acc", "mode": "max"},
        "cache_dir": cfg.cache_dir,
        "debug": {},
    }


def reference_inputs(config: Settings, data: GroupedDataset, seed: int | None = None,
                     epochs: int | None = None) -> dict[str, Any]:
    """What determines the reference model: its cache key, and part of its dependants' keys."""
    ref_cfg = reference_config(config, seed, epochs)
    return {"data": data.identity(), "backbone": backbone_identity(ref_cfg["backbone"]),
            "train": ref_cfg["train"], "seed": ref_cfg["seed"]}


def reference_key(config: Settings, data: GroupedDataset, seed: int | None = None,
                  epochs: int | None = None) -> str:
    """The reference model's cache key: what its dependants (GradCAM, overlays) key on."""
    return stage_key("reference", REFERENCE_VERSION, reference_inputs(config, data, seed, epochs))


def reference_model(config: Settings, data: GroupedDataset, cache: StageCache,
                    device: torch.device, seed: int | None = None,
                    epochs: int | None = None) -> Classifier:
    """The ERM model trained on the target (cached), in eval mode on `device`."""
    ref_cfg = reference_config(config, seed, epochs)
    inputs = reference_inputs(config, data, seed, epochs)

    def train() -> dict[str, Any]:
        trainer = Trainer(ref_cfg, ERM, device=str(device), data=data)
        for metrics in tqdm(trainer.epochs(), total=ref_cfg["train"]["epochs"],
                            desc="reference model (ERM)", leave=False,
                            disable=bars_disabled()):
            del metrics
        return {"model": {k: v.cpu() for k, v in trainer.model.state_dict().items()}}

    state = cache.get_or_compute("reference", REFERENCE_VERSION, inputs, train)
    model = build_classifier(ref_cfg["backbone"]["arch"], "none", {"target": data.n_classes})
    model.load_state_dict(state["model"])
    return model.to(device).eval()


@torch.no_grad()
def extract_features(model: Classifier, data: GroupedDataset, split: str, device: torch.device,
                     batch_size: int = 256, desc: str = "features") -> torch.Tensor:
    """Trunk features of one split with the eval transform, in split order (float32, CPU)."""
    model.eval()
    dataset = make_torch_dataset(data, split, train=False)
    out = torch.empty(len(dataset), model.feature_dim)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, positions in tqdm(loader, desc=f"{desc} ({split})", leave=False,
                                   disable=bars_disabled()):
        out[positions] = model.features(images.to(device)).float().cpu()
    return out


def predict(model: Classifier, data: GroupedDataset, split: str, device: torch.device,
            batch_size: int = 256) -> torch.Tensor:
    """Predicted classes of one split with the eval transform, in split order (CPU)."""
    dataset = make_torch_dataset(data, split, train=False)
    return torch.from_numpy(predict_classes(model, dataset, batch_size, device))


def features_inputs(config: Settings, data: GroupedDataset, source: str,
                    splits: tuple[str, ...] = SPLITS, normalize: bool = True) -> dict[str, Any]:
    """What determines the frozen features of `source` ('backbone' or 'reference')."""
    if source == "backbone":
        backbone = TrialConfig.of(config).backbone.model_dump()
        identity: dict[str, Any] = {"backbone": backbone_identity(backbone)}
    else:
        identity = {"reference": reference_inputs(config, data)}
    inputs = {"data": data.identity(), "source": source, **identity}
    if tuple(splits) != SPLITS:
        inputs["splits"] = list(splits)
    if not normalize:
        inputs["normalize"] = False
    return inputs


def features_key(config: Settings, data: GroupedDataset, source: str,
                 splits: tuple[str, ...] = SPLITS, normalize: bool = True) -> str:
    """The features' cache key: what stages built on them (k-means) key on."""
    return stage_key("features", FEATURES_VERSION,
                     features_inputs(config, data, source, splits, normalize))


def frozen_features(config: Settings, data: GroupedDataset, cache: StageCache,
                    device: torch.device, source: str, splits: tuple[str, ...] = SPLITS,
                    normalize: bool = True) -> dict[str, Any]:
    """Trunk features of ``splits`` (default: every split, what ClusterFix shares), from a
    frozen pretrained backbone (`source='backbone'`) or from the ERM reference model
    (`source='reference'`); L2-normalised (ClusterFix clusters directions) or raw
    (``normalize=False``: the penultimate embeddings DFR and SLIM's last layer refit on, as
    their reference code extracts them). Last-layer retraining asks for validation and test
    only: on CelebA the training split alone is 160k forward passes."""
    inputs = features_inputs(config, data, source, splits, normalize)

    def compute() -> dict[str, Any]:
        if source == "backbone":
            b = TrialConfig.of(config).backbone
            model = build_classifier(b.arch, b.weights, {"target": data.n_classes})
            model = model.to(device).eval()
        else:
            model = reference_model(config, data, cache, device)
        feats = {s: extract_features(model, data, s, device) for s in splits}
        if not normalize:
            return feats
        return {s: torch.nn.functional.normalize(f, dim=1) for s, f in feats.items()}

    return cache.get_or_compute("features", FEATURES_VERSION, inputs, compute)


# --------------------------------------------------------------------------- stage tasks
# What the sweep's planner runs as Ray tasks before the trials that read these stages
# (debias.stage_plan): each computes one stage into the cache by the very call a trial makes.


def _task_inputs(config: dict[str, Any]
                 ) -> tuple[TrialConfig, GroupedDataset, StageCache, torch.device]:
    """A stage task's typed settings, data, stage cache and device (its config comes over
    the wire as a plain dict)."""
    from debias.engine import trial_device

    cfg = TrialConfig.of(config)
    return cfg, cfg.load_data(), StageCache(cfg.cache_dir), trial_device(None)


def compute_reference(config: dict[str, Any], seed: int | None = None,
                      epochs: int | None = None) -> None:
    cfg, data, cache, device = _task_inputs(config)
    reference_model(cfg, data, cache, device, seed, epochs)


def compute_features(config: dict[str, Any], source: str, splits: list[str],
                     normalize: bool = True) -> None:
    cfg, data, cache, device = _task_inputs(config)
    frozen_features(cfg, data, cache, device, source, tuple(splits), normalize)


def reference_request(config: TrialConfig, data: GroupedDataset, seed: int | None = None,
                      epochs: int | None = None) -> StageRequest:
    n = float(epochs or config.reference.epochs)
    return StageRequest("reference", reference_key(config, data, seed, epochs),
                        "debias.stages:compute_reference", dict(config.raw),
                        {"seed": seed, "epochs": epochs},
                        work=(("train", "train", n), ("eval", "val", n), ("eval", "test", n)))


def features_requests(config: TrialConfig, data: GroupedDataset, source: str,
                      splits: tuple[str, ...] = SPLITS, normalize: bool = True
                      ) -> list[StageRequest]:
    """The features of ``source`` and, for the reference model's, the model first."""
    out = []
    after: tuple[str, ...] = ()
    if source == "reference":
        ref = reference_request(config, data)
        out.append(ref)
        after = (ref.key,)
    out.append(StageRequest("features", features_key(config, data, source, splits, normalize),
                            "debias.stages:compute_features", dict(config.raw),
                            {"source": source, "splits": list(splits), "normalize": normalize},
                            after, work=tuple(("eval", s, 1.0) for s in splits)))
    return out
