"""The torch Datasets that serve a :class:`~debias.data.grouped.GroupedDataset` split.

Three ways to hold the images, one item format: (normalised float C x H x W tensor, position
into ``data.view(split)``'s arrays). :func:`make_torch_dataset` picks the way:

- in memory (synthetic): the split converted once to one tensor, batches are slices;
- on disk, decoded once (Waterbirds, CelebA with a cache folder): the shared memory-mapped
  array of :mod:`debias.data.decoded`;
- on disk, decoded per item with PIL (no cache folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from debias.data.decoded import DecodedGroupedDataset
from debias.data.grouped import GroupedDataset, load_rgb
from debias.data.transforms import eval_transform, normalize_uint8, train_transform

__all__ = ["InMemoryGroupedDataset", "OnDiskGroupedDataset", "make_torch_dataset"]


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
    data.view(split)  # an unknown split raises ValueError before any work
    if data.images is not None:
        return InMemoryGroupedDataset(data, split)
    if cache_dir is not None:
        return DecodedGroupedDataset(data, split, train, cache_dir)
    return OnDiskGroupedDataset(data, split, train)
