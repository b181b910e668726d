"""Seeds derived from what a random stream is *for*, never from global state.

Every stream (weight init, data order, augmentation, curation picks, solver shuffles) takes
its seed from (trial seed, purpose, step), so resuming, reordering or packing trials in one
process cannot change which numbers a trial sees.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

__all__ = ["derive_seed", "seed_everything"]


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts, stable across processes (unlike Python's hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
