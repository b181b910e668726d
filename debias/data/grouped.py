"""The one table every dataset is reduced to, and the torch Dataset that serves it.

Every dataset (synthetic, Waterbirds, CelebA) is turned into a :class:`GroupedDataset` first so
that training, evaluation and caching code never needs to know where the data came from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from debias.data.transforms import eval_transform, normalize_uint8, train_transform

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CODES: dict[str, int] = {name: code for code, name in enumerate(SPLITS)}


class DatasetError(Exception):
    """Missing or malformed data; the message says what, where it looked, and where to get it."""


def _split_code(split: str) -> int:
    try:
        return SPLIT_CODES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}") from None


def _readonly(arr: np.ndarray) -> np.ndarray:
    """Cached datasets are shared between trials, so nobody may mutate them in place."""
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class SplitView:
    """One split of one (target, bias) view; arrays are aligned with each other."""

    split: str
    ids: np.ndarray
    y: np.ndarray
    a: np.ndarray
    index: np.ndarray

    @property
    def group(self) -> np.ndarray:
        """Group id y * 2 + a, the unit that worst-group metrics and reweighting work on."""
        return self.y * 2 + self.a

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
                a=_readonly(self.a[index].astype(np.int64)),
                index=_readonly(index),
            )
            self._views[split] = cached
        return cached

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


class InMemoryGroupedDataset(torch.utils.data.Dataset):
    """In-memory split pre-converted once to a normalised float tensor, so batches are slices."""

    def __init__(self, data: GroupedDataset, split: str) -> None:
        assert data.images is not None
        self.view = data.view(split)
        self.tensor = normalize_uint8(data.images[self.view.index])

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return self.tensor[position], int(position)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        idx = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        batch = self.tensor.index_select(0, idx)
        return [(batch[i], int(p)) for i, p in enumerate(idx.tolist())]


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


class OnDiskGroupedDataset(torch.utils.data.Dataset):
    """Images read lazily with PIL; a bad file raises DatasetError naming it, not a PIL error."""

    def __init__(self, data: GroupedDataset, split: str, train: bool) -> None:
        assert data.image_paths is not None
        self.view = data.view(split)
        self.paths = tuple(data.image_paths[i] for i in self.view.index)
        self.transform = train_transform(data.image_size) if train else eval_transform(
            data.image_size)

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.paths[position])), int(position)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        return [self[int(p)] for p in positions]


def make_torch_dataset(data: GroupedDataset, split: str, train: bool,
                       cache_dir: str | Path | None = None) -> torch.utils.data.Dataset:
    """Items are (normalised float CxHxW tensor, position into ``data.view(split)`` arrays).

    ``cache_dir`` only matters for on-disk datasets (Waterbirds, CelebA): given, every image
    is decoded and resized once into ``<cache_dir>/decoded/<key>.npy`` (built once per node,
    under a lock) and all trials read it memory-mapped, sharing the OS page cache, instead of
    decoding each JPEG with PIL every epoch (see :mod:`debias.data.decoded`). None: decode
    with PIL per item, as before. In-memory datasets (synthetic) ignore it.
    """
    _split_code(split)
    if data.images is not None:
        return InMemoryGroupedDataset(data, split)
    if cache_dir is not None:
        from debias.data.decoded import DecodedGroupedDataset  # imports this module

        return DecodedGroupedDataset(data, split, train, cache_dir)
    return OnDiskGroupedDataset(data, split, train)
