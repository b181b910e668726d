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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from debias.cache import StageCache
from debias.data import GroupedDataset, make_torch_dataset
from debias.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from debias.models import Classifier
from debias.slim.annotations import (
    AnnotationError,
    group_annotator,
    read_annotations,
    simulated_annotator,
)
from debias.slim.attention import compute_attention, gradcam_images, overlay_png
from debias.slim.curation import CELL_SHARES, curate
from debias.slim.propagation import class_gammas, propagate
from debias.slim.sampling import per_class_budget, sample_for_annotation
from debias.slim.space import EMBEDDINGS, embed_per_class

__all__ = ["ANNOTATORS", "SLIM_DEFAULTS", "attention_stage", "curated_subset",
           "model_fingerprint", "request_rows", "slim_settings", "write_overlays"]

GRADCAM_VERSION = 1
SPACE_VERSION = 1
CURATION_VERSION = 3
ANNOTATORS = ("simulated", "csv")

SLIM_DEFAULTS: dict[str, Any] = {
    "budget_per_class": 10,
    "neighbours": 5,
    "gamma": [10.0, 5.0],
    "alpha": 0.01,
    "keep_quantile": 0.5,
    "curated_size": 120,
    "cell_share": "spread",
    "k_range": [2, 5],
    "embedding": "pca",
    "annotator": "simulated",
    "annotations": None,
    "aiou_threshold": 0.3,
    "seed": 0,
    "curation_seed": None,
    "batch_size": 64,
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def slim_settings(config: dict[str, Any], n_classes: int = 2) -> dict[str, Any]:
    """``config["slim"]`` over the defaults, checked; messages name the knob and the rule.

    Keys this module does not know (e.g. retraining knobs) are passed through untouched.
    """
    s = {**SLIM_DEFAULTS, **(config.get("slim") or {})}

    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"slim.{name} must be {rule}, got {s[name]!r}")

    per_class_budget(s["budget_per_class"], n_classes)  # raises with its own message
    if not _is_int(s["neighbours"]) or s["neighbours"] < 1:
        raise bad("neighbours", "a positive integer")
    s["gamma"] = class_gammas(s["gamma"], n_classes)
    if not _is_number(s["alpha"]) or not 0 < s["alpha"] < 1:
        raise bad("alpha", "a number in (0, 1)")
    if not _is_number(s["keep_quantile"]) or not 0 <= s["keep_quantile"] < 1:
        raise bad("keep_quantile", "a number in [0, 1)")
    if not _is_int(s["curated_size"]) or s["curated_size"] < 1:
        raise bad("curated_size", "a positive integer")
    k = s["k_range"]
    if (not isinstance(k, list | tuple) or len(k) != 2 or not all(_is_int(v) for v in k)
            or not 1 <= k[0] <= k[1]):
        raise bad("k_range", "[min, max] integers with 1 <= min <= max")
    s["k_range"] = [int(k[0]), int(k[1])]
    if s["cell_share"] not in CELL_SHARES:
        raise bad("cell_share", f"one of {CELL_SHARES}")
    if s["embedding"] not in EMBEDDINGS:
        raise bad("embedding", f"one of {EMBEDDINGS}")
    if s["annotator"] not in ANNOTATORS:
        raise bad("annotator", f"one of {ANNOTATORS}")
    if s["annotator"] == "csv" and not s["annotations"]:
        raise bad("annotations", "the path of the annotation CSV when annotator is 'csv'")
    if not _is_number(s["aiou_threshold"]) or not 0 <= s["aiou_threshold"] <= 1:
        raise bad("aiou_threshold", "a number in [0, 1]")
    if not _is_int(s["seed"]):
        raise bad("seed", "an integer")
    if s["curation_seed"] is None:
        s["curation_seed"] = s["seed"]
    if not _is_int(s["curation_seed"]):
        raise bad("curation_seed", "an integer (or null: the same as seed)")
    if not _is_int(s["batch_size"]) or s["batch_size"] < 1:
        raise bad("batch_size", "a positive integer")
    return s


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's state (names, shapes, dtypes, bytes): a key for its GradCAM maps."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().reshape(-1).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def attention_stage(data: GroupedDataset, model: Classifier, cache: StageCache,
                    device: torch.device | str, model_key: str, batch_size: int = 64,
                    split: str = "train") -> tuple[dict[str, Any], dict[str, Any]]:
    """(cached attention of one split, the stage's key inputs).

    Image-size CAMs are not stored (CelebA's would take ~16 GB); AIOU is computed from them
    while they are in memory, and overlays re-run GradCAM on the few images they need.
    """
    inputs = {"data": data.identity(), "model": model_key, "split": split}

    def compute() -> dict[str, Any]:
        att = compute_attention(model, data, split, device, batch_size, keep_cams=False)
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
                      device: torch.device | str, model_key: str, s: dict[str, Any],
                      split: str, pool: np.ndarray | None) -> dict[str, Any]:
    """The cached attention of ``split``, restricted to ``pool`` (sorted; default: all)."""
    view = data.view(split)
    pool = (np.arange(len(view), dtype=np.int64) if pool is None
            else np.sort(np.asarray(pool, dtype=np.int64)))
    att, inputs = attention_stage(data, model, cache, device, model_key, s["batch_size"],
                                  split)
    return {"pool": pool, "y": np.asarray(view.y)[pool], "v": att["v"].numpy()[pool],
            "v_bar": att["v_bar"].numpy()[pool], "aiou": att["aiou"].numpy()[pool],
            "has_masks": bool(att["has_masks"]),
            "inputs": {"gradcam": inputs,
                       "pool": None if len(pool) == len(view) else _pool_digest(pool)}}


def _space(cache: StageCache, pooled: dict[str, Any], s: dict[str, Any]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(E, E-bar): the pool's attention and background vectors embedded in 2-D per class,
    cached: curations that differ in any other knob share them."""
    inputs = {**pooled["inputs"], "embedding": s["embedding"], "seed": s["seed"]}

    def compute() -> dict[str, Any]:
        return {name: torch.from_numpy(embed_per_class(pooled[key], pooled["y"],
                                                       s["embedding"], s["seed"]))
                for name, key in (("e", "v"), ("e_bar", "v_bar"))}

    space = cache.get_or_compute("space", SPACE_VERSION, inputs, compute)
    return space["e"].numpy(), space["e_bar"].numpy()


def _sample(e: np.ndarray, y: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    """The pool indices to show a person: fixed by the embedding, budget and ``seed``."""
    return sample_for_annotation(e, y, s["budget_per_class"], s["neighbours"], s["seed"])


def request_rows(config: dict[str, Any], data: GroupedDataset, model: Classifier,
                 cache: StageCache, device: torch.device | str, model_key: str,
                 path: Path, split: str = "train", pool: np.ndarray | None = None
                 ) -> list[dict[str, Any]]:
    """The rows a person must answer for this sampling (overlays written beside ``path``):
    what :func:`curated_subset` reads back for the same settings, split and pool."""
    s = slim_settings(config, data.n_classes)
    pooled = _pooled_attention(data, model, cache, device, model_key, s, split, pool)
    positions = pooled["pool"][_sample(_space(cache, pooled, s)[0], pooled["y"], s)]
    view = data.view(split)
    written = write_overlays(path.with_name(f"{path.stem}_overlays"), data, model, device,
                             positions, split)
    return [{"id": str(view.ids[p]), "split": split, "position": int(p),
             "label_class": int(view.y[p]), "image_path": str(image),
             "overlay_path": str(overlay)}
            for p, (image, overlay) in zip(positions, written, strict=True)]


def curated_subset(config: dict[str, Any], data: GroupedDataset, model: Classifier,
                   cache: StageCache, device: torch.device | str,
                   model_key: str | None = None, split: str = "train",
                   pool: np.ndarray | None = None) -> dict[str, Any]:
    """The curated subset of ``split`` (drawn from ``pool``, default the whole split) and what
    it cost (see module docstring).

    ``model_key`` identifies the reference model in the cache key (e.g. the hash of the
    reference stage's inputs); by default the model's weights are hashed. Only the
    curation's own choices depend on ``curation_seed``, so re-curating with other seeds (the
    retrains of last-layer mode) reuses the same annotated images.

    Returns ``positions`` (LongTensor of positions in ``split``), ``annotated_positions``,
    ``annotated`` (images shown to the annotator), ``annotated_fraction`` (of the pool),
    ``aiou_mean`` (pool; NaN without masks), ``propagated_kept``, ``annotator``
    (``simulated-aiou``, ``simulated-group`` or ``csv``), ``simulated`` and a few diagnostics.
    """
    view = data.view(split)
    s = slim_settings(config, data.n_classes)
    key = model_key if model_key is not None else model_fingerprint(model)
    pooled = _pooled_attention(data, model, cache, device, key, s, split, pool)
    pool, y, aiou = pooled["pool"], pooled["y"], pooled["aiou"]
    has_masks = pooled["has_masks"]
    if s["annotator"] == "csv":
        annotator = "csv"
    else:
        annotator = "simulated-aiou" if has_masks else "simulated-group"

    inputs: dict[str, Any] = {
        **pooled["inputs"],
        **{k: s[k] for k in ("budget_per_class", "neighbours", "gamma", "alpha",
                             "keep_quantile", "curated_size", "k_range", "embedding", "seed",
                             "curation_seed", "cell_share")},
        "annotator": annotator,
        "threshold": s["aiou_threshold"] if annotator == "simulated-aiou" else None,
    }
    csv_path = Path(s["annotations"]) if annotator == "csv" else None
    if csv_path is not None:
        if not csv_path.is_file():
            raise AnnotationError(
                f"annotation file {csv_path} does not exist: build the request with `python "
                "launch.py SWEEP.yaml --annotate` (or by running the sweep, which writes it "
                "before any trial starts), then answer it")
        inputs["annotations_sha256"] = _file_digest(csv_path)

    def compute() -> dict[str, Any]:
        e, e_bar = _space(cache, pooled, s)
        sampled = _sample(e, y, s)
        if annotator == "csv":
            assert csv_path is not None
            ids = [str(view.ids[p]) for p in pool[sampled]]
            answers = read_annotations(csv_path, ids, split)
            labels = np.array([answers[i] for i in ids], dtype=np.int64)
        elif annotator == "simulated-aiou":
            labels = simulated_annotator(aiou[sampled], s["aiou_threshold"])
        else:  # the majority bias value of a class is the training split's, on any split
            train = data.view("train")
            labels = group_annotator(view.y[pool[sampled]], view.a[pool[sampled]],
                                     majority_of=(train.y, train.a))
        prop = propagate(e, y, sampled, labels, s["gamma"], s["alpha"], s["keep_quantile"])
        kept = np.flatnonzero(prop.keep)
        cur = curate(e, e_bar, y, kept, s["curated_size"], s["k_range"], s["curation_seed"],
                     s["cell_share"])
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
