"""Seeded k-means on small, low-dimensional point sets, run single-threaded.

SLIM clusters 2-D embeddings of a few thousand points dozens of times per curation. At that
size OpenMP's thread start-up and synchronisation cost far more than the arithmetic (on a
busy 2-core machine, 40 ms instead of 1 ms per fit), and parallel trials would oversubscribe
the cores anyway, so every fit here runs on one thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

if TYPE_CHECKING:  # scikit-learn is imported where it runs (see debias/linear_heads.py)
    from sklearn.cluster import KMeans

__all__ = ["kmeans"]


def kmeans(x: np.ndarray, k: int, seed: int, n_init: int = 10) -> KMeans:
    """A fitted ``KMeans(k)`` (10 restarts, ``random_state=seed``) on one thread."""
    from sklearn.cluster import KMeans

    with threadpool_limits(limits=1):
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
