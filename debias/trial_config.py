"""A trial's settings, typed: what every trial, stage task and method reads.

Ray Tune carries a trial's config as a plain nested dict (it pickles it, hands it to the
searcher, writes it beside checkpoints), and the stage cache's keys hash plain values. So the
dict stays the wire format, and the typed sections are rebuilt from it once, at the trial's
edge (:meth:`TrialConfig.of`, which returns a ``TrialConfig`` unchanged): nothing below reads
the dict by key. ``raw`` keeps the dict for the places that need plain values (stage keys, the
config saved beside a selected model, stage requests sent to Ray tasks). A method's own
section is typed by the method itself (``Method.params_of``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from debias.sections import Backbone, Cache, Dataset, Debug, Reference, Selection, Train

__all__ = ["Settings", "TrialConfig"]


@dataclass(frozen=True)
class TrialConfig:
    """One trial's resolved settings (its pipeline's base with the search's values and its
    seed applied), as typed sections."""

    raw: Mapping[str, Any]
    #: The method's name ('' for settings that only describe a shared stage's inputs).
    method: str
    target: str
    bias: str
    seed: int
    #: The search's trial seed (what a person's annotation sample is drawn with: it must not
    #: change with the reported seed).
    search_seed: int
    dataset: Dataset
    backbone: Backbone
    train: Train
    reference: Reference
    selection: Selection
    cache: Cache
    debug: Debug
    #: The sweep's stage cache (``<storage>/cache``), shared by every node.
    cache_dir: str

    @classmethod
    def of(cls, config: Settings) -> TrialConfig:
        """The typed settings of a trial config (the one place that reads its keys)."""
        if isinstance(config, TrialConfig):
            return config
        raw = dict(config)
        seed = int(raw["seed"])
        return cls(
            raw=raw, method=str(raw.get("method", "")), target=str(raw["target"]),
            bias=str(raw["bias"]), seed=seed, search_seed=int(raw.get("search_seed", seed)),
            dataset=Dataset.model_validate(raw["dataset"]),
            backbone=Backbone.model_validate(raw["backbone"]),
            train=Train.model_validate(raw["train"]),
            reference=Reference.model_validate(raw.get("reference") or {}),
            selection=Selection.model_validate(raw.get("selection") or {}),
            cache=Cache.model_validate(raw.get("cache") or {}),
            debug=Debug.model_validate(raw.get("debug") or {}),
            cache_dir=str(raw["cache_dir"]))

    def with_seed(self, seed: int) -> TrialConfig:
        """The same settings with another seed (a stage shared across a trial's seeds)."""
        return dataclasses.replace(self, seed=seed, raw={**self.raw, "seed": seed})

    def section(self, name: str) -> Mapping[str, Any]:
        """A method's own section as the file gave it (its ``Params`` types it)."""
        return self.raw.get(name) or {}

    def load_data(self) -> Any:
        """The trial's (target, bias) view of its dataset (this process's cached copy)."""
        from debias.data import load_grouped

        return load_grouped(self.dataset.model_dump(), self.target, self.bias)

    @property
    def decoded_dir(self) -> str | None:
        """Where the decoded images live (:meth:`debias.sections.Cache.decoded_dir`)."""
        folder = self.cache.decoded_dir(self.cache_dir)
        return None if folder is None else str(folder)


#: A trial's settings, typed or as Tune carries them (what a function that may be called with
#: either takes, and turns into a :class:`TrialConfig` with :meth:`TrialConfig.of`).
Settings = TrialConfig | Mapping[str, Any]
