"""Embedded synthetic dataset: scikit-learn digits rendered on coloured / striped backgrounds.

It needs no download, so sweeps and tests can run anywhere. The background colour is a far easier
cue than the digit shape, so plain ERM latches onto it exactly like on Waterbirds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import numpy as np

from debias.data.grouped import DatasetError, GroupedDataset, _readonly

DIGIT_ATTRIBUTES: tuple[str, ...] = ("Odd", "High", "Loopy")
RENDER_ATTRIBUTES: tuple[str, ...] = ("Background", "Texture")
ATTRIBUTES: tuple[str, ...] = DIGIT_ATTRIBUTES + RENDER_ATTRIBUTES

DEFAULT_IMAGE_SIZE = 32
DEFAULT_SPURIOUS_CORRELATION = 0.95
DEFAULT_SEED = 0
# Bump when the rendering changes so that identity()-keyed caches are invalidated.
GENERATOR_VERSION = 1

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
WARM = np.array([0.80, 0.35, 0.25], dtype=np.float32)  # Background = 0
COOL = np.array([0.25, 0.40, 0.80], dtype=np.float32)  # Background = 1
COLOUR_JITTER = 0.04
STRIPE_DARKEN = 0.65
DIGIT_SCALE = 0.7
MASK_THRESHOLD = 0.25


def check_pair(target: str, bias: str) -> str | None:
    """A usable pair is one digit attribute and one rendering attribute, in either order."""
    for role, attr in (("target", target), ("bias", bias)):
        if attr not in ATTRIBUTES:
            return (f"synthetic: unknown {role} attribute {attr!r}; digit attributes are "
                    f"{', '.join(DIGIT_ATTRIBUTES)} and rendering attributes are "
                    f"{', '.join(RENDER_ATTRIBUTES)}")
    if target == bias:
        return f"synthetic: target and bias are both {target!r}; they must differ"
    kinds = {attr in DIGIT_ATTRIBUTES for attr in (target, bias)}
    if kinds != {True, False}:
        kind = "digit" if True in kinds else "rendering"
        return (f"synthetic: {target!r} and {bias!r} are both {kind} attributes; a pair needs one "
                f"digit attribute ({', '.join(DIGIT_ATTRIBUTES)}) and one rendering attribute "
                f"({', '.join(RENDER_ATTRIBUTES)}), in either order")
    return None


def _rng(*parts: Any) -> np.random.Generator:
    """Generator seeded from a stable hash (never Python's hash(), never the global RNG)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digits as float32 in [0, 1] and their labels (loaded once per process)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0).clip(0.0, 1.0)
    return _readonly(images), _readonly(np.asarray(bunch.target, dtype=np.int64))


@functools.lru_cache(maxsize=4)
def _upscaled_digits(size: int) -> np.ndarray:
    """Digits bilinearly upscaled to size x size; used as the alpha channel when blending."""
    import torch
    import torch.nn.functional as F

    images, _ = _digits()
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    up = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return _readonly(up.squeeze(1).clamp_(0.0, 1.0).numpy())


def _digit_attributes(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "Odd": (labels % 2 == 1).astype(np.int64),
        "High": (labels >= 5).astype(np.int64),
        "Loopy": np.isin(labels, (0, 6, 8, 9)).astype(np.int64),
    }


def _parse_cfg(cfg: dict) -> tuple[int, float, int]:
    image_size = cfg.get("image_size", DEFAULT_IMAGE_SIZE)
    sc = cfg.get("spurious_correlation", DEFAULT_SPURIOUS_CORRELATION)
    seed = cfg.get("seed", DEFAULT_SEED)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise DatasetError(f"synthetic: image_size must be an integer >= 8, got {image_size!r}")
    if isinstance(sc, bool) or not isinstance(sc, int | float) or not 0.0 <= sc <= 1.0:
        raise DatasetError(
            f"synthetic: spurious_correlation must be a number in [0, 1], got {sc!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"synthetic: seed must be an integer, got {seed!r}")
    return image_size, float(sc), seed


def _assign_splits(n: int, seed: int) -> np.ndarray:
    """Seeded 60/20/20 split; depends on the seed only, so every pair shares the same split."""
    perm = _rng("synthetic-split", seed).permutation(n)
    n_train = round(SPLIT_FRACTIONS[0] * n)
    n_val = round(SPLIT_FRACTIONS[1] * n)
    split = np.empty(n, dtype=np.int8)
    split[perm[:n_train]] = 0
    split[perm[n_train:n_train + n_val]] = 1
    split[perm[n_train + n_val:]] = 2
    return split


def _correlated_attribute(
    digit: np.ndarray, split: np.ndarray, sc: float, rng: np.random.Generator
) -> np.ndarray:
    """Rendering attribute that agrees with ``digit`` on a ``sc`` fraction of train samples.

    The minority count per class is exactly round((1 - sc) * n_class) rather than a coin flip, so
    the train correlation is what was asked for and small minority groups are not lost to noise.
    In val and test each class is split half/half, so every group is (almost exactly) balanced.
    """
    out = np.empty_like(digit)
    for code in (0, 1, 2):
        for c in (0, 1):
            idx = rng.permutation(np.flatnonzero((split == code) & (digit == c)))
            n_minority = round((1.0 - sc) * len(idx)) if code == 0 else len(idx) // 2
            out[idx[:n_minority]] = 1 - c
            out[idx[n_minority:]] = c
    return out


def _render(
    background: np.ndarray, texture: np.ndarray, image_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw every digit on its background; returns uint8 N x S x S x 3 images and bool masks."""
    alpha_all = _upscaled_digits(max(4, round(DIGIT_SCALE * image_size)))
    n, d = alpha_all.shape[0], alpha_all.shape[1]
    colours = np.where(background[:, None] == 1, COOL, WARM)
    colours = (colours + rng.normal(0.0, COLOUR_JITTER, size=(n, 3))).clip(0.0, 1.0)
    offsets = rng.integers(0, image_size - d + 1, size=(n, 2))
    greys = rng.uniform(0.85, 1.0, size=n)
    stripe_width = max(1, image_size // 16)
    stripe_rows = (np.arange(image_size) // stripe_width) % 2 == 1
    shade = np.where(stripe_rows, STRIPE_DARKEN, 1.0).astype(np.float32)[:, None, None]

    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    masks = np.zeros((n, image_size, image_size), dtype=bool)
    for i in range(n):
        canvas = np.broadcast_to(colours[i].astype(np.float32), (image_size, image_size, 3))
        canvas = canvas * shade if texture[i] else canvas.copy()
        oy, ox = offsets[i]
        alpha = alpha_all[i][..., None]
        patch = canvas[oy:oy + d, ox:ox + d]
        canvas[oy:oy + d, ox:ox + d] = patch * (1.0 - alpha) + greys[i] * alpha
        images[i] = np.rint(canvas * 255.0).clip(0, 255).astype(np.uint8)
        masks[i, oy:oy + d, ox:ox + d] = alpha_all[i] > MASK_THRESHOLD
    return images, masks


def load(cfg: dict, target: str, bias: str) -> GroupedDataset:
    """Generate the dataset deterministically from (seed, target, bias, correlation, size)."""
    reason = check_pair(target, bias)
    if reason is not None:
        raise DatasetError(reason)
    image_size, sc, seed = _parse_cfg(cfg)

    _, labels = _digits()
    n = len(labels)
    split = _assign_splits(n, seed)
    attrs = _digit_attributes(labels)
    digit_name = target if target in DIGIT_ATTRIBUTES else bias
    render_name = bias if digit_name == target else target
    attr_rng = _rng("synthetic-attributes", seed, target, bias, sc)
    attrs[render_name] = _correlated_attribute(attrs[digit_name], split, sc, attr_rng)
    other = next(r for r in RENDER_ATTRIBUTES if r != render_name)
    attrs[other] = attr_rng.integers(0, 2, size=n, dtype=np.int64)

    render_rng = _rng("synthetic-render", seed, target, bias, sc, image_size)
    images, masks = _render(attrs["Background"], attrs["Texture"], image_size, render_rng)
    source = json.dumps({"seed": seed, "spurious_correlation": sc, "version": GENERATOR_VERSION},
                        sort_keys=True)
    return GroupedDataset(
        name="synthetic",
        target=target,
        bias=bias,
        ids=_readonly(np.array([f"digit{i:04d}" for i in range(n)])),
        split=_readonly(split),
        y=_readonly(attrs[target].copy()),
        a=_readonly(attrs[bias].copy()),
        image_size=image_size,
        images=_readonly(images),
        image_paths=None,
        masks=_readonly(masks),
        source=source,
    )
