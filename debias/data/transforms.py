"""Image transforms shared by all datasets (ImageNet statistics, so pretrained backbones fit).

torchvision is imported by the functions that build its transforms, not with the module: it
takes ~1.5 s (it pulls in torch._dynamo), and a trial on in-memory images never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torchvision import transforms as T

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def train_transform(image_size: int) -> T.Compose:
    """Light augmentation for on-disk photos; the crop keeps most of the scene (and its bias)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.7, 1.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int) -> T.Compose:
    """Deterministic resize + centre crop (the usual 256/224 ratio) for evaluation."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def normalize_uint8(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W normalised float32, in one vectorised step.

    In-memory (synthetic) images are already at the right size and must not be flipped (digits
    are not mirror-symmetric), so normalisation is the only transform they get.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
