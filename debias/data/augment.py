"""Batched image ops of the input pipeline: random resized crop + flip, centre crop and
normalisation of a whole batch of uint8 images at once, on whatever device holds it.

Why batched tensor ops rather than torchvision's per-item PIL transforms: at 224 px a
per-item ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` costs
more CPU than a ResNet's GPU step needs per image (BENCHMARKS.md, "Input pipeline"); here the
host only gathers uint8 squares and the device crops, resizes and normalises them.

The crop is torchvision's ``RandomResizedCrop(size, scale=(0.7, 1.0))`` (the same algorithm:
up to ten tries of an area fraction and a log-uniform aspect ratio, then the centre-crop
fallback), resampled with antialiased bilinear interpolation as PIL does; on a CPU the
resampling runs on uint8 (``F.interpolate``'s antialiased uint8 kernel, rounding to uint8 like
PIL), on a GPU on float32 (no rounding: the values differ from the CPU's by under one grey
level). Given the same boxes, the batched crop equals the per-item PIL crop within
interpolation error (tested).

Randomness comes from the caller's seed only (one seed per batch: :class:`BoxDraws`), never
from torch's or numpy's global state, so the same batch gets the same crops whichever process
(DataLoader worker or trial) and device (CPU or GPU) does the work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from debias.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CROP_RATIO", "CROP_SCALE", "BoxDraws", "Boxes", "centre", "normalize",
           "resized_crops"]

#: What torchvision's RandomResizedCrop is built with for training (transforms.py).
CROP_SCALE: tuple[float, float] = (0.7, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
_TRIES = 10  # torchvision's get_params tries ten (area, ratio) draws before falling back


@dataclass(frozen=True)
class Boxes:
    """Per image: the crop's top, left, height, width (pixels) and whether to mirror it."""

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray

    def __len__(self) -> int:
        return len(self.top)

    def one(self, i: int) -> tuple[int, int, int, int, bool]:
        return (int(self.top[i]), int(self.left[i]), int(self.height[i]), int(self.width[i]),
                bool(self.flip[i]))


@dataclass(frozen=True)
class BoxDraws:
    """The uniform draws of a batch's crops, taken before the images' sizes are known (the
    PIL path learns each size only when it decodes the image), turned into boxes by
    :meth:`boxes`. One seed gives the same draws in any process."""

    area: np.ndarray  # (n, tries) uniform in [0, 1): area fraction within CROP_SCALE
    log_ratio: np.ndarray  # (n, tries) uniform in [0, 1): log aspect ratio within CROP_RATIO
    top: np.ndarray  # (n,) uniform in [0, 1): where the box starts among the positions left
    left: np.ndarray
    flip: np.ndarray  # (n,) bool, p = 0.5

    @classmethod
    def sample(cls, seed: int, n: int) -> BoxDraws:
        rng = np.random.default_rng(seed)
        return cls(area=rng.random((n, _TRIES)), log_ratio=rng.random((n, _TRIES)),
                   top=rng.random(n), left=rng.random(n), flip=rng.random(n) < 0.5)

    def boxes(self, heights: Sequence[int] | np.ndarray, widths: Sequence[int] | np.ndarray,
              scale: tuple[float, float] = CROP_SCALE,
              ratio: tuple[float, float] = CROP_RATIO) -> Boxes:
        """torchvision's ``RandomResizedCrop.get_params`` for every image at once: the first
        of the ten (area, ratio) tries whose box fits, else the centre crop of the largest
        box of an allowed ratio."""
        height = np.broadcast_to(np.asarray(heights, dtype=np.int64), self.top.shape)
        width = np.broadcast_to(np.asarray(widths, dtype=np.int64), self.top.shape)
        area = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * self.area)
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = np.exp(lo + (hi - lo) * self.log_ratio)
        w = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # round half to even, as round()
        h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
        first = fits.argmax(axis=1)
        rows = np.arange(len(first))
        ok = fits[rows, first]
        bw, bh = w[rows, first], h[rows, first]
        # The fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
        in_ratio = width / height
        fw = np.where(in_ratio < ratio[0], width,
                      np.where(in_ratio > ratio[1], np.rint(height * ratio[1]), width))
        fh = np.where(in_ratio < ratio[0], np.rint(width / ratio[0]), height)
        bw = np.where(ok, bw, fw).astype(np.int64)
        bh = np.where(ok, bh, fh).astype(np.int64)
        top = np.where(ok, np.floor(self.top * (height - bh + 1)), (height - bh) // 2)
        left = np.where(ok, np.floor(self.left * (width - bw + 1)), (width - bw) // 2)
        return Boxes(top=top.astype(np.int64), left=left.astype(np.int64), height=bh,
                     width=bw, flip=self.flip.copy())


def resized_crops(images: torch.Tensor, boxes: Boxes, size: int,
                  uint8: bool | None = None) -> torch.Tensor:
    """Crop each of N x H x W x 3 uint8 ``images`` to its box, resize it to ``size`` x
    ``size`` (antialiased bilinear) and mirror it where the box says: N x 3 x size x size
    (channels-last) on the images' device.

    ``uint8`` (default: on a CPU) resamples uint8 and rounds like PIL; otherwise float32 in
    [0, 255] (what a GPU does: its interpolation kernels are float). One call per image (the
    boxes differ in size, so there is no single batched resampling); the images never leave
    their device."""
    n = images.shape[0]
    if len(boxes) != n:
        raise ValueError(f"{len(boxes)} boxes for {n} images")
    if uint8 is None:
        uint8 = images.device.type == "cpu"
    source = images.permute(0, 3, 1, 2)  # a channels-last view: no copy
    if not uint8:
        source = source.float()
    out = torch.empty((n, 3, size, size), dtype=torch.uint8 if uint8 else torch.float32,
                      device=images.device).contiguous(memory_format=torch.channels_last)
    for i in range(n):
        top, left, h, w, flip = boxes.one(i)
        crop = source[i:i + 1, :, top:top + h, left:left + w]
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)
        out[i] = resized[0].flip(-1) if flip else resized[0]
    return out


def centre(images: torch.Tensor | np.ndarray, size: int) -> tuple[int, int]:
    """Where torchvision's CenterCrop(size) starts in an N x H x W x 3 batch: (top, left)."""
    height, width = images.shape[1], images.shape[2]
    return round((height - size) / 2.0), round((width - size) / 2.0)


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std per channel, as 1 x 3 x 1 x 1 tensors on ``device``."""
    if device not in _STATS:
        _STATS[device] = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                          torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
    return _STATS[device]


def normalize(images: torch.Tensor,
              memory_format: torch.memory_format = torch.contiguous_format,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """N x 3 x H x W images in [0, 255] (uint8 or float, any layout) -> float32 normalised
    with the ImageNet statistics, in ``memory_format`` (or into ``out``).

    The same arithmetic as torchvision's ``ToTensor`` + ``Normalize`` (divide by 255, subtract
    the mean, divide by the std), so an evaluation batch equals the per-item path's bit for
    bit; one converting copy (the copy a layout change needs anyway), then in place."""
    mean, std = _stats(images.device)
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device,
                          memory_format=memory_format)
    out.copy_(images)
    return out.div_(255.0).sub_(mean).div_(std)
