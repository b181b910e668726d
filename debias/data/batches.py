"""What travels through the input pipeline: a request for a batch, the batch as the host
holds it, and the last step that turns it into the model's input on the trial's device.

A batch is requested as (split, sorted positions, augmentation seed) rather than as a list of
indices, so that a source can read it in one sorted gather and every random draw of the batch
follows from its seed, whichever process serves it (:mod:`debias.data.pipeline`).

A host batch comes in one of three stages:

- ``squares``: uint8 N x S x S x 3, the decoded cache's stored squares, still to be cropped
  with the batch's seed (training on a GPU: the device crops);
- ``crops``: uint8 N x s x s x 3 at the final geometry (evaluation, and the PIL path, whose
  crops are cut from each photo as it is decoded): only normalisation is left;
- ``ready``: float32 N x 3 x s x s, normalised (in-memory data; or finished in a DataLoader
  worker for a CPU trial, so the augmentation overlaps the training step).

uint8 crosses the host-device link (4x less than float32), from pinned memory, without
blocking; the crop, flip and normalisation run where the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from debias.data.augment import BoxDraws, normalize, resized_crops

__all__ = ["STAGES", "BatchRequest", "HostBatch", "finish", "host_empty"]

STAGES = ("squares", "crops", "ready")


@dataclass(frozen=True)
class BatchRequest:
    """One batch of one split: ``positions`` (into ``data.view(split)``, sorted so a source
    reads its rows in order) and the seed of its augmentation (None: evaluation transform)."""

    split: str
    positions: np.ndarray
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class HostBatch:
    """A batch on the host: images at ``stage`` (see the module docstring), the positions
    they belong to, and the seed their crops are still to be drawn from (``squares``)."""

    images: torch.Tensor
    positions: torch.Tensor
    stage: str
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown batch stage {self.stage!r}; expected one of {STAGES}")
        if self.stage == "squares" and self.seed is None:
            raise ValueError("a batch of uncropped squares needs the seed of its crops")

    def pin_memory(self) -> HostBatch:
        """Called by the DataLoader's pinning thread (CUDA trials): page-locked memory lets
        the copy to the GPU run without blocking."""
        return replace(self, images=self.images.pin_memory(),
                       positions=self.positions.pin_memory())

    def __len__(self) -> int:
        return len(self.positions)


def host_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8, pin: bool = False
               ) -> torch.Tensor:
    """An uninitialised host tensor for a batch: page-locked with ``pin`` (a CUDA trial: the
    copy to the GPU then runs without blocking; torch's caching host allocator reuses the
    block once that copy is done); in a DataLoader worker in shared memory at once (sending
    it to the trial's process then costs no second copy); otherwise from numpy's allocator,
    which reuses a freed block of the same size instead of faulting in fresh pages each batch
    (twice as fast as a fresh torch allocation at 224 px: BENCHMARKS.md, "Input pipeline")."""
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    if torch.utils.data.get_worker_info() is not None:
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.from_numpy(np.empty(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype))


def finish(batch: HostBatch, image_size: int, device: torch.device,
           memory_format: torch.memory_format = torch.contiguous_format,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The model's input: normalised float32 N x 3 x s x s on ``device`` in
    ``memory_format`` (or written into ``out``); whatever crop and flip is left is done
    there."""
    images = batch.images.to(device, non_blocking=True)
    if batch.stage == "ready":
        return images.contiguous(memory_format=memory_format)
    if batch.stage == "squares":
        assert batch.seed is not None
        boxes = BoxDraws.sample(batch.seed, len(batch)).boxes(images.shape[1], images.shape[2])
        chw = resized_crops(images, boxes, image_size)
    else:
        chw = images.permute(0, 3, 1, 2)
    return normalize(chw, memory_format, out)
