"""Datasets reduced to one grouped table: public entry points used by the sweep service."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from types import ModuleType
from typing import Any

from debias.data import celeba, metadata, synthetic, waterbirds
from debias.data.grouped import (
    SPLITS,
    BiasLabelsHidden,
    DatasetError,
    GroupedDataset,
    SplitView,
)
from debias.data.torch_data import make_torch_dataset

__all__ = [
    "DATASETS",
    "SPLITS",
    "BiasLabelsHidden",
    "DatasetError",
    "GroupedDataset",
    "SplitView",
    "check_pair",
    "clear_cache",
    "dataset_attributes",
    "has_masks",
    "load_grouped",
    "make_torch_dataset",
]

DATASETS: tuple[str, ...] = ("synthetic", "waterbirds", "celeba", "metadata")
_MODULES: dict[str, ModuleType] = {
    "synthetic": synthetic, "waterbirds": waterbirds, "celeba": celeba, "metadata": metadata}


def _module(name: str) -> ModuleType:
    try:
        return _MODULES[name]
    except (KeyError, TypeError):
        raise DatasetError(
            f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None


def dataset_attributes(name: str, cfg: dict | None = None) -> tuple[str, ...]:
    """Attribute names a sweep file is validated against: known statically for the built-in
    datasets, read from the CSV's header line for ``metadata`` (raises DatasetError when it
    cannot be read; without ``cfg``, none)."""
    if name == "metadata":
        return metadata.attributes(cfg) if cfg is not None else ()
    return tuple(_module(name).ATTRIBUTES)


def has_masks(name: str) -> bool:
    """Whether a dataset comes with foreground masks (what a simulated SLIM annotator scores
    attention against; without them it answers from the groups)."""
    return bool(getattr(_MODULES.get(name), "HAS_MASKS", False))


def check_pair(name: str, target: str, bias: str, cfg: dict | None = None) -> str | None:
    """None if (target, bias) is usable for the dataset, else a reason a human can act on
    (``cfg``: the dataset section, for datasets whose attributes are read from disk)."""
    if name not in _MODULES:
        return f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}"
    if name == "metadata":
        return metadata.check_pair(target, bias, cfg)
    return _MODULES[name].check_pair(target, bias)


def _freeze(value: Any) -> Hashable:
    """Hashable, order-independent form of a cfg value, for the in-process cache key."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, set | frozenset):
        return tuple(sorted(_freeze(v) for v in value))
    return value


@functools.lru_cache(maxsize=8)
def _load_cached(key: Hashable, target: str, bias: str) -> GroupedDataset:
    cfg = dict(key)  # type: ignore[arg-type]
    return _module(cfg.get("name")).load(cfg, target, bias)


def load_grouped(cfg: dict, target: str, bias: str) -> GroupedDataset:
    """Load (or reuse from this process's cache) one (target, bias) view of a dataset.

    Many trials in one process ask for the same data, so results are cached; arrays are read-only
    because they are shared. Failures are not cached, so fixing the data on disk and retrying works.
    """
    if not isinstance(cfg, dict):
        raise DatasetError(f"dataset config must be a mapping, got {type(cfg).__name__}")
    module = _module(cfg.get("name"))
    reason = module.check_pair(target, bias)
    if reason is not None:
        raise DatasetError(reason)
    return _load_cached(_freeze(cfg), target, bias)


def clear_cache() -> None:
    """Drop cached datasets (tests, or a long-lived process that wants its memory back)."""
    _load_cached.cache_clear()
