"""How much of a model's attention falls on the object: AIOU and soft IoU (ALGORITHMS.md).

AIOU is the share of *high* attention (normalised CAM >= delta) that lies inside the
foreground mask; soft IoU compares the whole normalised CAM with the mask. Both normalise a
copy of the CAM: the original code normalised the map in place between the two scores, so
the second one was computed on a different map. Nothing here writes into its inputs.

Flat CAMs (constant maps, typically all zero after GradCAM's ReLU: the model found no
positive evidence for the class) have no high-attention region at all. They score 0.0 on
both measures rather than NaN: "no attention on the object" is what a person looking at an
empty overlay would answer, and a NaN would silently drop the image from means and from the
simulated annotator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["aiou", "aiou_batch", "minmax_batch", "soft_iou", "soft_iou_batch"]

DEFAULT_DELTA = 0.8


def minmax_batch(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max scaling of an (N, H, W) stack to [0, 1] (a new float64 array).

    A constant map becomes all zeros (see the module note on flat CAMs).
    """
    x = np.asarray(maps, dtype=np.float64)
    lo = x.min(axis=(1, 2), keepdims=True)
    span = x.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)


def _resize_to(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (N, h, w) stack to ``size``; a no-op when already that size."""
    if maps.shape[1:] == size:
        return maps
    t = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float64)).unsqueeze(1)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False).squeeze(1).numpy()


def _prepare(cams: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stacks as float64 copies: CAMs at mask size, min-max normalised; masks in [0, 1]."""
    cams = np.asarray(cams)
    masks = np.asarray(masks)
    if cams.ndim != 3 or masks.ndim != 3 or len(cams) != len(masks):
        raise ValueError(f"expected (N, H, W) CAMs and masks of equal N, got {cams.shape} and "
                         f"{masks.shape}")
    # Normalise at image size (after resizing), as the definition says.
    a = minmax_batch(_resize_to(np.asarray(cams, dtype=np.float64), masks.shape[1:]))
    m = masks.astype(np.float64)
    return a, m


def aiou_batch(cams: np.ndarray, masks: np.ndarray, delta: float = DEFAULT_DELTA) -> np.ndarray:
    """AIOU per image: sum(A*M over A*M >= delta) / sum(A over A >= delta), A = minmax(CAM).

    CAMs of another size than the masks are resized bilinearly first. Flat CAMs give 0.0.
    """
    a, m = _prepare(cams, masks)
    am = a * m
    num = np.where(am >= delta, am, 0.0).sum(axis=(1, 2))
    den = np.where(a >= delta, a, 0.0).sum(axis=(1, 2))
    # den is >= 1 whenever the map is not flat (its maximum is exactly 1 after scaling).
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def soft_iou_batch(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Soft IoU per image: sum(min(M, A)) / sum(max(M, A)); 0.0 when both maps are empty."""
    a, m = _prepare(cams, masks)
    num = np.minimum(a, m).sum(axis=(1, 2))
    den = np.maximum(a, m).sum(axis=(1, 2))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def aiou(cam: np.ndarray, mask: np.ndarray, delta: float = DEFAULT_DELTA) -> float:
    """AIOU of one (H, W) CAM against one (H, W) foreground mask."""
    return float(aiou_batch(np.asarray(cam)[None], np.asarray(mask)[None], delta)[0])


def soft_iou(cam: np.ndarray, mask: np.ndarray) -> float:
    """Soft IoU of one (H, W) CAM against one (H, W) foreground mask."""
    return float(soft_iou_batch(np.asarray(cam)[None], np.asarray(mask)[None])[0])
