"""The attention representation space: v and vbar each embedded in two dimensions.

The reference (xiweix/SLIM, ``utils/analysis.py::get_attention_new``) fits one UMAP
(n_neighbors 5, min_dist 0, random_state 0) on the vectors of every image of the split, both
classes together, and one more on the reverse vectors, and uses the raw coordinates:
``scope: joint``, the default. ``scope: per_class`` embeds each class's vectors on their own
(SLIM samples, propagates and curates within a class, and a joint embedding spends part of
its two dimensions separating the classes) and standardises each axis, so distances mean the
same thing for every class. UMAP is the original's choice; PCA the dependency-free option.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EMBEDDINGS", "SCOPES", "embed_2d", "embed_per_class", "embed_space", "standardise"]

EMBEDDINGS = ("pca", "umap")
SCOPES = ("joint", "per_class")


def standardise(x: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance per column (constant columns are only centred)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return x.copy()
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _pca(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA  # where it runs: see debias/linear_heads.py

    n_comp = min(2, *x.shape)
    out = np.zeros((len(x), 2))
    if n_comp > 0 and len(x) > 1:
        out[:, :n_comp] = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    return out


def _umap(x: np.ndarray, seed: int, n_neighbors: int, min_dist: float) -> np.ndarray:
    try:
        import umap
    except ImportError as exc:
        raise ImportError(
            "embedding 'umap' needs the umap-learn package, which is not installed here "
            "(pip install umap-learn); or set slim.embedding: pca") from exc
    if len(x) <= n_neighbors + 1:
        # Too few points for a neighbour graph; the linear map is the honest answer.
        return _pca(x, seed)
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                        random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def embed_2d(x: np.ndarray, method: str = "pca", seed: int = 0, n_neighbors: int = 5,
             min_dist: float = 0.0, standardised: bool = True) -> np.ndarray:
    """(N, D) vectors -> (N, 2) coordinates (standardised per axis unless told otherwise);
    deterministic for a seed.

    The inputs are used as they are (Euclidean geometry of the raw vectors, as in the
    original). At most ``n_neighbors + 1`` images fall back to PCA under UMAP (a neighbour
    graph needs neighbours).
    """
    if method not in EMBEDDINGS:
        raise ValueError(f"unknown embedding {method!r}; expected one of {EMBEDDINGS}")
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    e = _pca(x, seed) if method == "pca" else _umap(x, seed, n_neighbors, min_dist)
    return standardise(e) if standardised else e


def embed_per_class(x: np.ndarray, y: np.ndarray, method: str = "pca", seed: int = 0,
                    n_neighbors: int = 5, min_dist: float = 0.0) -> np.ndarray:
    """:func:`embed_2d` run on each class's rows separately; (N, 2), aligned with ``x``."""
    y = np.asarray(y)
    out = np.zeros((len(x), 2))
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        out[rows] = embed_2d(np.asarray(x)[rows], method, seed, n_neighbors, min_dist)
    return out


def embed_space(x: np.ndarray, y: np.ndarray, method: str = "umap", seed: int = 0,
                scope: str = "joint") -> np.ndarray:
    """The attention space of a pool of images: one embedding of all of them (``joint``, raw
    coordinates, the reference's) or one per class (``per_class``, standardised)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown embedding scope {scope!r}; expected one of {SCOPES}")
    if scope == "per_class":
        return embed_per_class(x, y, method, seed)
    return embed_2d(x, method, seed, standardised=False)
