"""SLIM's data side end to end: attention -> space -> sample -> annotate -> spread -> curate.

Three cached stages. "gradcam" (GradCAM over one split, reduced to the attention vectors and
AIOU) depends only on the data, the split and the reference model, so a sweep over SLIM's knobs
computes it once. "space" (the two 2-D embeddings of the pool, E and E-bar) adds the embedding
method and seed: UMAP on CelebA's training split takes minutes, and no curation knob changes
it. "curation" adds every knob that changes the subset (and, for human annotations, the
content of the filled-in CSV, so editing the file invalidates it).

The split is ``train`` for full retraining and ``val`` for last-layer retraining, where only a
``pool`` of validation positions (half of the split; the other half selects the model) may be
sampled, annotated and curated.

Annotators: ``simulated`` uses AIOU against foreground masks when the dataset has them, and
otherwise the group-based stand-in (bias labels!); the result names the one used so runs can
be tagged as simulated. AIOU is reported only where masks exist (NaN otherwise, never
estimated). ``csv`` reads a person's answers; when the file is not there yet, the request
(CSV plus overlay PNGs beside it) is written and an AnnotationError says what to fill in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from debias.cache import StageCache
from debias.data import GroupedDataset, make_torch_dataset
from debias.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from debias.models import Classifier
from debias.seeding import derive_seed
from debias.slim.annotations import (
    AnnotationError,
    group_annotator,
    read_annotations,
    simulated_annotator,
)
from debias.slim.attention import compute_attention, gradcam_images, overlay_png
from debias.slim.curation import curate, curate_reference
from debias.slim.propagation import class_gammas, propagate
from debias.slim.sampling import sample_for_annotation
from debias.slim.space import embed_space

__all__ = ["ANNOTATORS", "GRADCAM_BATCH", "SlimKnobs", "attention_stage", "curated_subset",
           "model_fingerprint", "request_rows", "write_overlays"]

GRADCAM_VERSION = 1
SPACE_VERSION = 3  # 3: joint (the reference's) or per-class embedding
CURATION_VERSION = 5  # 5: the reference's propagation (scalar standardisation, global cut)
ANNOTATORS = ("simulated", "csv", "random")
#: Images per GradCAM batch (it needs gradients, so smaller than an evaluation batch).
GRADCAM_BATCH = 64


class SlimKnobs(Protocol):
    """The ``slim`` section's knobs the pipeline reads: the method's typed parameters
    (:class:`debias.methods.slim.SLIMParams`), the only place their defaults live."""

    budget_per_class: int
    neighbours: int
    gamma: list[float]
    alpha: float
    keep_quantile: float
    keep_scope: str
    curated_size: int
    k_max: int
    cell_share: str
    curation: str
    embedding: str
    embedding_scope: str
    annotator: str
    retrain: str
    annotations: str | None
    aiou_threshold: float


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's state (names, shapes, dtypes, bytes): a key for its GradCAM maps."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().reshape(-1).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def attention_stage(data: GroupedDataset, model: Classifier, cache: StageCache,
                    device: torch.device | str, model_key: str, split: str = "train"
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cached attention of one split, the stage's key inputs).

    Image-size CAMs are not stored (CelebA's would take ~16 GB); AIOU is computed from them
    while they are in memory, and overlays re-run GradCAM on the few images they need.
    """
    inputs = {"data": data.identity(), "model": model_key, "split": split}

    def compute() -> dict[str, Any]:
        att = compute_attention(model, data, split, device, GRADCAM_BATCH, keep_cams=False)
        return {**att, "has_masks": data.masks is not None}

    return cache.get_or_compute("gradcam", GRADCAM_VERSION, inputs, compute), inputs


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _uint8_images(tensors: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation: what the model saw, as N x H x W x 3 uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (tensors.cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def write_overlays(folder: Path, data: GroupedDataset, model: Classifier,
                   device: torch.device | str, positions: np.ndarray,
                   split: str = "train") -> list[tuple[Path, Path]]:
    """GradCAM overlays (image | overlay | CAM >= 0.8) of positions of ``split``, as PNGs
    named by sample id; returns (image path, overlay path) per position. Images of in-memory
    datasets are written beside the overlays so a person can open them."""
    view = data.view(split)
    dataset = make_torch_dataset(data, split, train=False)
    tensors = torch.stack([dataset[int(p)][0] for p in positions])
    cams = gradcam_images(model, tensors, view.y[positions], device)["cam"].numpy()
    images = _uint8_images(tensors)
    out = []
    for i, p in enumerate(positions):
        sample_id = str(view.ids[p])
        overlay = overlay_png(images[i], cams[i], folder / f"{sample_id}_overlay.png")
        if data.image_paths is not None:
            image_path = Path(data.image_paths[view.index[p]])
        else:
            image_path = folder / f"{sample_id}_image.png"
            Image.fromarray(images[i]).save(image_path)
        out.append((image_path, overlay))
    return out


def _mean_or_nan(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(x)) if len(x) and not np.isnan(x).any() else math.nan


def _pool_digest(pool: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pool, dtype=np.int64).tobytes()).hexdigest()[:16]


def _pooled_attention(data: GroupedDataset, model: Classifier, cache: StageCache,
                      device: torch.device | str, model_key: str, split: str,
                      pool: np.ndarray | None) -> dict[str, Any]:
    """The cached attention of ``split``, restricted to ``pool`` (sorted; default: all)."""
    view = data.view(split)
    pool = (np.arange(len(view), dtype=np.int64) if pool is None
            else np.sort(np.asarray(pool, dtype=np.int64)))
    att, inputs = attention_stage(data, model, cache, device, model_key, split)
    return {"pool": pool, "y": np.asarray(view.y)[pool], "v": att["v"].numpy()[pool],
            "v_bar": att["v_bar"].numpy()[pool], "aiou": att["aiou"].numpy()[pool],
            "has_masks": bool(att["has_masks"]),
            "inputs": {"gradcam": inputs,
                       "pool": None if len(pool) == len(view) else _pool_digest(pool)}}


def _space(cache: StageCache, pooled: dict[str, Any], embedding: str, seed: int,
           scope: str) -> tuple[np.ndarray, np.ndarray]:
    """(E, E-bar): the pool's attention and background vectors embedded in 2-D (jointly or
    per class), cached: curations that differ in any other knob share them."""
    inputs = {**pooled["inputs"], "embedding": embedding, "seed": seed, "scope": scope}

    def compute() -> dict[str, Any]:
        return {name: torch.from_numpy(embed_space(pooled[key], pooled["y"], embedding, seed,
                                                   scope))
                for name, key in (("e", "v"), ("e_bar", "v_bar"))}

    space = cache.get_or_compute("space", SPACE_VERSION, inputs, compute)
    return space["e"].numpy(), space["e_bar"].numpy()


def _sample(e: np.ndarray, y: np.ndarray, s: SlimKnobs, seed: int) -> np.ndarray:
    """The pool indices to show a person: fixed by the embedding, budget and ``seed``."""
    return sample_for_annotation(e, y, s.budget_per_class, s.neighbours, seed)


def request_rows(s: SlimKnobs, data: GroupedDataset, model: Classifier,
                 cache: StageCache, device: torch.device | str, model_key: str,
                 path: Path, split: str = "train", pool: np.ndarray | None = None,
                 seed: int = 0) -> list[dict[str, Any]]:
    """The rows a person must answer for this sampling (overlays written beside ``path``):
    what :func:`curated_subset` reads back for the same knobs, split, pool and seed."""
    pooled = _pooled_attention(data, model, cache, device, model_key, split, pool)
    positions = pooled["pool"][_sample(
        _space(cache, pooled, s.embedding, seed, s.embedding_scope)[0], pooled["y"], s, seed)]
    view = data.view(split)
    written = write_overlays(path.with_name(f"{path.stem}_overlays"), data, model, device,
                             positions, split)
    return [{"id": str(view.ids[p]), "split": split, "position": int(p),
             "label_class": int(view.y[p]), "image_path": str(image),
             "overlay_path": str(overlay)}
            for p, (image, overlay) in zip(positions, written, strict=True)]


def curated_subset(s: SlimKnobs, data: GroupedDataset, model: Classifier,
                   cache: StageCache, device: torch.device | str,
                   model_key: str | None = None, split: str = "train",
                   pool: np.ndarray | None = None, seed: int = 0,
                   curation_seed: int | None = None,
                   oracle: Callable[[str], np.ndarray] | None = None) -> dict[str, Any]:
    """The curated subset of ``split`` (drawn from ``pool``, default the whole split) and what
    it cost (see module docstring).

    ``model_key`` identifies the reference model in the cache key (e.g. the hash of the
    reference stage's inputs); by default the model's weights are hashed. ``seed`` fixes the
    embedding and which images are annotated; only the curation's own choices depend on
    ``curation_seed`` (default: ``seed``), so re-curating with other seeds (the retrains of
    last-layer mode) reuses the same annotated images. ``oracle(split)`` gives the bias labels
    a *simulated* person knows (the group-based stand-in annotator, used where the dataset
    has no masks); without it that annotator cannot run.

    Returns ``positions`` (LongTensor of positions in ``split``), ``annotated_positions``,
    ``annotated`` (images shown to the annotator), ``annotated_fraction`` (of the pool),
    ``aiou_mean`` (pool; NaN without masks), ``propagated_kept``, ``annotator``
    (``simulated-aiou``, ``simulated-group`` or ``csv``), ``simulated`` and a few diagnostics.
    """
    view = data.view(split)
    curation_seed = seed if curation_seed is None else curation_seed
    key = model_key if model_key is not None else model_fingerprint(model)
    pooled = _pooled_attention(data, model, cache, device, key, split, pool)
    pool, y, aiou = pooled["pool"], pooled["y"], pooled["aiou"]
    has_masks = pooled["has_masks"]
    if s.annotator in ("csv", "random"):
        annotator = s.annotator
    else:
        annotator = "simulated-aiou" if has_masks else "simulated-group"
    gamma = class_gammas(s.gamma, data.n_classes)
    k_range = [2, s.k_max]

    inputs: dict[str, Any] = {
        **pooled["inputs"],
        **{k: getattr(s, k) for k in ("budget_per_class", "neighbours", "alpha",
                                      "keep_quantile", "keep_scope", "curated_size",
                                      "embedding", "embedding_scope", "cell_share",
                                      "curation")},
        "gamma": gamma, "k_range": k_range, "seed": seed, "curation_seed": curation_seed,
        "annotator": annotator,
        "threshold": s.aiou_threshold if annotator == "simulated-aiou" else None,
    }
    csv_path = Path(s.annotations) if annotator == "csv" and s.annotations else None
    if csv_path is not None:
        if not csv_path.exists():
            raise AnnotationError(
                f"annotation file {csv_path} does not exist: build the request with `python "
                "launch.py SWEEP.yaml --annotate` (or by running the sweep, which writes it "
                "before any trial starts), then answer it")
        inputs["annotations_sha256"] = _file_digest(csv_path)

    def compute() -> dict[str, Any]:
        e, e_bar = _space(cache, pooled, s.embedding, seed, s.embedding_scope)
        sampled = _sample(e, y, s, seed)
        if annotator == "csv":
            assert csv_path is not None
            ids = [str(view.ids[p]) for p in pool[sampled]]
            answers = read_annotations(csv_path, ids, split)
            labels = np.array([answers[i] for i in ids], dtype=np.int64)
        elif annotator == "simulated-aiou":
            labels = simulated_annotator(aiou[sampled], s.aiou_threshold)
        elif annotator == "random":  # the ablation: answers that carry no information
            rng = np.random.default_rng(derive_seed(seed, "random-annotator"))
            labels = rng.integers(0, 2, size=len(sampled)).astype(np.int64)
        else:  # the majority bias value of a class is the training split's, on any split
            if oracle is None:
                raise ValueError("the group-based simulated annotator needs the oracle of "
                                 "bias labels (this dataset has no foreground masks)")
            train = data.view("train")
            labels = group_annotator(view.y[pool[sampled]], oracle(split)[pool[sampled]],
                                     majority_of=(train.y, oracle("train")))
        prop = propagate(e, y, sampled, labels, gamma, s.alpha, s.keep_quantile,
                         keep_scope=s.keep_scope)
        kept = np.flatnonzero(prop.keep)
        if s.curation == "reference":
            cur = curate_reference(e, e_bar, kept, s.curated_size, k_range, curation_seed,
                                   s.cell_share)
        else:
            cur = curate(e, e_bar, y, kept, s.curated_size, k_range, curation_seed,
                         s.cell_share)
        return {
            "split": split,
            "positions": torch.from_numpy(pool[cur.positions]),
            "annotated_positions": torch.from_numpy(pool[sampled]),
            "annotation_labels": torch.from_numpy(labels),
            "annotated": len(sampled),
            "annotated_fraction": len(sampled) / max(1, len(pool)),
            "unsure": int((labels == -1).sum()),
            "aiou_mean": _mean_or_nan(aiou) if has_masks else math.nan,
            "aiou_mean_curated": (_mean_or_nan(aiou[cur.positions]) if has_masks else math.nan),
            "propagated_kept": len(kept),
            "propagation_notes": {int(c): n for c, n in prop.notes.items()},
            "curation_k": {int(c): [d["k_e"], d["k_ebar"]] for c, d in cur.details.items()},
            "annotator": annotator,
            "simulated": annotator != "csv",
        }

    return cache.get_or_compute("curation", CURATION_VERSION, inputs, compute)
