"""The one table every dataset is reduced to.

Every dataset (synthetic, Waterbirds, CelebA) is turned into a :class:`GroupedDataset` first so
that training, evaluation and caching code never needs to know where the data came from. The
table is a leaf: the torch datasets that serve it (:mod:`debias.data.torch_data`, including
the decoded-image cache of :mod:`debias.data.decoded`) build on it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CODES: dict[str, int] = {name: code for code, name in enumerate(SPLITS)}


class DatasetError(Exception):
    """Missing or malformed data; the message says what, where it looked, and where to get it."""


class BiasLabelsHidden(LookupError):
    """A method read bias labels it declared it does not use (see ``without_bias``)."""


def _split_code(split: str) -> int:
    try:
        return SPLIT_CODES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}") from None


def content_source(root: Path, files: Sequence[Path], n_images: int) -> str:
    """What identifies a dataset on disk: its root, the content hash of its metadata files
    and how many images it lists. New labels or images at the same root then change every
    stage key built on the dataset (image files are not hashed: CelebA has 200k of them)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return json.dumps({"root": str(root), "metadata_sha256": digest.hexdigest()[:20],
                       "images": int(n_images)}, sort_keys=True)


def _readonly(arr: np.ndarray) -> np.ndarray:
    """Cached datasets are shared between trials, so nobody may mutate them in place."""
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class SplitView:
    """One split of one (target, bias) view; arrays are aligned with each other.

    ``bias`` is None where the table hides this split's bias labels: reading ``a`` (or
    ``group``) then raises :class:`BiasLabelsHidden` instead of handing a method labels it
    promised not to use.
    """

    split: str
    ids: np.ndarray
    y: np.ndarray
    bias: np.ndarray | None
    index: np.ndarray
    n_bias: int = 2

    @property
    def a(self) -> np.ndarray:
        if self.bias is None:
            raise BiasLabelsHidden(
                f"the {self.split} split's bias labels are hidden from this method: it "
                "declares (Method.bias_labels) that it does not use them")
        return self.bias

    @property
    def group(self) -> np.ndarray:
        """Group id y * n_bias + a, the unit that worst-group metrics and reweighting work
        on."""
        return self.y * self.n_bias + self.a

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class GroupedDataset:
    """SubpopBench-style table: ids, split code, target label y, bias label a, and the images.

    ``source`` describes where the content came from (resolved root or synthetic parameters);
    it is part of :meth:`identity` so that two roots never share a cache entry.
    """

    name: str
    target: str
    bias: str
    ids: np.ndarray
    split: np.ndarray
    y: np.ndarray
    a: np.ndarray
    image_size: int
    images: np.ndarray | None
    image_paths: tuple[Path, ...] | None
    masks: np.ndarray | None
    n_classes: int = 2
    n_bias: int = 2
    source: str = ""
    #: Splits whose bias labels this table hides (see :meth:`without_bias`).
    hidden_bias: frozenset[str] = frozenset()
    #: What each class (target) and bias code stands for, where the data names them (the
    #: metadata CSV's values); empty: the codes are the values (0 and 1).
    class_names: tuple[str, ...] = ()
    bias_names: tuple[str, ...] = ()
    _views: ClassVar[dict[str, SplitView]]  # per-instance cache, set in __post_init__

    def __post_init__(self) -> None:
        n = len(self.ids)
        for field in ("split", "y", "a"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"GroupedDataset.{field} has length "
                                 f"{len(getattr(self, field))}, expected {n}")
        if self.images is None and self.image_paths is None:
            raise ValueError("GroupedDataset needs either images or image_paths")
        if self.images is not None and len(self.images) != n:
            raise ValueError(f"GroupedDataset.images has length {len(self.images)}, expected {n}")
        if self.image_paths is not None and len(self.image_paths) != n:
            raise ValueError(
                f"GroupedDataset.image_paths has length {len(self.image_paths)}, expected {n}")
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"GroupedDataset.masks has length {len(self.masks)}, expected {n}")
        # Views are asked for per batch by training loops; build each split's view once.
        object.__setattr__(self, "_views", {})

    def __len__(self) -> int:
        return len(self.ids)

    def view(self, split: str) -> SplitView:
        """Rows of one split, with their positions in the full table for mask/image lookup.

        Built once per split and shared (arrays read-only), so calling it per batch is cheap.
        """
        cached = self._views.get(split)
        if cached is None:
            index = np.flatnonzero(self.split == _split_code(split)).astype(np.int64)
            cached = SplitView(
                split=split,
                ids=_readonly(self.ids[index]),
                y=_readonly(self.y[index].astype(np.int64)),
                bias=(None if split in self.hidden_bias
                      else _readonly(self.a[index].astype(np.int64))),
                index=_readonly(index),
                n_bias=self.n_bias,
            )
            self._views[split] = cached
        return cached

    def without_bias(self, *splits: str) -> GroupedDataset:
        """The same table with the bias labels of ``splits`` hidden: what a method that uses
        no bias labels for training is given. Identity (cache keys) is unchanged: the content
        is the same, only what the reader may see differs."""
        for split in splits:
            _split_code(split)
        hidden = self.hidden_bias | frozenset(splits)
        if hidden == self.hidden_bias:
            return self
        return dataclasses.replace(self, hidden_bias=hidden)

    def group_counts(self, split: str) -> np.ndarray:
        """(n_classes, n_bias) sample counts (a fresh array, safe to modify)."""
        v = self.view(split)
        counts = np.zeros((self.n_classes, self.n_bias), dtype=np.int64)
        np.add.at(counts, (v.y, v.a), 1)
        return counts

    def identity(self) -> str:
        """Stable short hash of everything that determines the content (used as a cache key)."""
        payload = json.dumps(
            {
                "name": self.name,
                "source": self.source,
                "target": self.target,
                "bias": self.bias,
                "image_size": int(self.image_size),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_rgb(path: Path) -> Image.Image:
    """One image as RGB; a missing or bad file raises DatasetError naming it, not a PIL error."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file {path} does not exist (it did when the dataset "
                           "was indexed; was the data moved or deleted?)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"image file {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
            "expected a readable JPEG/PNG. Re-download or re-extract the dataset.") from exc
