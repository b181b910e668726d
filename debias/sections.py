"""The sections every sweep file has, as typed models: what each key is, its default, its
bounds and whether a search may vary it.

One declaration per key (:mod:`debias.params`): :mod:`debias.spec` validates sweep files with
these models, :mod:`debias.schema` turns them into the JSON Schema, and the trial receives
them typed (:class:`debias.trial_config.TrialConfig`). A method's own section is its
``Params``, declared in the method's module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    Strict,
    ValidationInfo,
    model_serializer,
    model_validator,
)

from debias.data import DATASETS
from debias.models import ARCHS
from debias.params import (
    Choice,
    Flag,
    Float,
    Int,
    Number,
    SearchDomain,
    Section,
    Text,
    defer,
    show,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE", "LABEL_FREE_METRICS", "MAX_SEED", "METADATA_ONLY", "SECTIONS",
    "SELECTION_METRICS", "SHARED_SEARCHABLE", "SYNTHETIC_ONLY", "Asha", "Backbone", "Cache",
    "Dataset", "Debug", "Domain", "MetadataSplits", "Reference", "Resources", "Scheduler",
    "Search", "Selection", "Tracking", "Train",
]


#: The largest seed: what numpy's RandomState (Optuna's samplers seed it) accepts, 2**32 - 1;
#: torch and numpy's Generator accept more.
MAX_SEED = 2**32 - 1


class Train(Section):
    """SGD (or Adam) of the trial's model; every method that trains by epochs reads it."""

    epochs: int = Int(10, 1, 10_000)
    batch_size: int = Int(64, 1, 65_536)
    eval_batch_size: int = Int(256, 1, 65_536, searchable=False)
    optimizer: Literal["sgd", "adam", "adamw"] = Choice("sgd")
    lr: Number = Float(1e-2, 0, 10, lo_open=True)
    weight_decay: Number = Float(1e-4, 0, 10)
    momentum: Number = Float(0.9, 0, 1, hi_open=True)
    scheduler: Literal["none", "cosine"] = Choice("none")
    num_workers: Literal["auto"] | Annotated[int, Strict(), at.Ge(0), at.Le(64)] = Field(
        "auto", description="DataLoader workers per trial; auto: none for in-memory data, "
        "else resources.cpu on a GPU trial, one fewer on a CPU trial",
        json_schema_extra={"x-searchable": False,
                           "x-expected": "'auto' or an integer in [0, 64]"})
    augment: Literal["auto", "on", "off"] = Choice(
        "auto", doc="random-resized-crop + flip of on-disk training images; auto: what the "
                    "method's reference code does (off for GroupDRO and JTT, on for the "
                    "others); in-memory (synthetic) images are never augmented")
    # GPU path: bf16 autocast (CUDA only; ignored on CPU), channels_last tensors, torch.compile.
    amp: bool = Flag(False)
    channels_last: bool = Flag(False)
    compile: bool = Flag(False)


class Backbone(Section):
    arch: Literal[ARCHS] = Choice("small_cnn")
    weights: str = Text("none", expected="'imagenet', 'none' or a path to a state_dict file",
                        doc="checked up front: a path must exist")


class Reference(Section):
    """The ERM reference model ClusterFix (where no pretrained backbone exists), SLIM, JTT
    and DFR start from. Fixed per sweep and never searched, so every trial of a seed shares
    one cached model; its seed is the trial's, so reported seeds re-train it."""

    epochs: int = Int(10, 1, 10_000, searchable=False)
    batch_size: int = Int(64, 1, 65_536, searchable=False)
    optimizer: Literal["sgd", "adam", "adamw"] = Choice("sgd", searchable=False)
    lr: Number = Float(0.05, 0, 10, lo_open=True, searchable=False)
    weight_decay: Number = Float(5e-4, 0, 10, searchable=False)
    momentum: Number = Float(0.9, 0, 1, hi_open=True, searchable=False)
    scheduler: Literal["none", "cosine"] = Choice("none", searchable=False)


def _split_value(value: Any) -> Any:
    """A split column's value as written in the CSV: YAML reads ``0`` as an int."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class MetadataSplits(Section):
    """metadata: what the split column holds for each split."""

    train: Annotated[str, BeforeValidator(_split_value)] = Text("train")
    val: Annotated[str, BeforeValidator(_split_value)] = Text("val")
    test: Annotated[str, BeforeValidator(_split_value)] = Text("test")


SYNTHETIC_ONLY = ("spurious_correlation", "seed", "size")
METADATA_ONLY = ("file", "path_column", "split_column", "splits")
DEFAULT_IMAGE_SIZE = {"synthetic": 32, "waterbirds": 224, "celeba": 224, "metadata": 224}


class Dataset(Section):
    """Which images: the embedded benchmark, a published layout (root: its folder) or any
    folder with a metadata CSV. Keys of another kind of dataset are refused when set to
    anything but their default, and left out of the resolved config (and its hash)."""

    name: Literal[DATASETS] = Choice(..., searchable=False)
    root: str | None = Text(None, doc="real datasets: the folder holding its files")
    image_size: int | None = Int(None, 8, 1024, searchable=False)
    spurious_correlation: Number = Float(
        0.95, 0.5, 1.0, searchable=False,
        doc="synthetic: P(background matches the target) in train; val/test balanced")
    seed: int = Int(0, 0, MAX_SEED, searchable=False, doc="synthetic: draws another dataset")
    size: int = Int(5000, 100, 5000, searchable=False,
                    doc="synthetic: how many of the 5,000 digits (a seeded subset; smaller for "
                        "quick runs, the default for results)")
    file: str = Text("metadata.csv", doc="metadata: the CSV (a row per image), under root")
    path_column: str = Text("path", doc="metadata: the column of image paths (under root)")
    split_column: str = Text("split", doc="metadata: the column naming each image's split")
    splits: MetadataSplits = Field(
        default_factory=MetadataSplits, description="metadata: the split column's values",
        json_schema_extra={"x-searchable": False, "x-expected": "a mapping {train: VALUE, "
                           "val: VALUE, test: VALUE} of the split column's values"})

    @model_validator(mode="after")
    def _of_its_kind(self, info: ValidationInfo) -> Dataset:
        lines = [f"dataset.{key}: got {show(_dump(getattr(self, key)))}; only a metadata "
                 f"dataset (dataset.name: metadata) has it, not {self.name}"
                 for key in METADATA_ONLY if self.name != "metadata"
                 and key in self.model_fields_set and _dump(getattr(self, key)) !=
                 _dump(type(self).model_fields[key].get_default(call_default_factory=True))]
        if self.name != "synthetic" and self.root is None:
            lines.append(f"dataset.root: missing; the {self.name} dataset needs the folder "
                         "that holds its files (see README, 'Datasets')")
        if lines:
            defer(info, *lines)  # the targets can still be checked against its attributes
        if self.image_size is None:
            return self.model_copy(update={"image_size": DEFAULT_IMAGE_SIZE[self.name]})
        return self

    @model_serializer(mode="wrap")
    def _applicable(self, dump: Any) -> dict[str, Any]:
        drop = (*(() if self.name == "metadata" else METADATA_ONLY),
                *(("root",) if self.name == "synthetic" else SYNTHETIC_ONLY))
        return {k: v for k, v in dump(self).items() if k not in drop}


def _dump(value: Any) -> Any:
    return value.model_dump() if isinstance(value, Section) else value




class Domain(Section):
    """One searched key as the file writes it (its JSON Schema; :mod:`debias.spec` parses it
    into a :class:`debias.params.SearchDomain` with messages naming the key)."""

    model_config = ConfigDict(json_schema_extra={
        "description": "{float: [lo, hi]} or {int: [lo, hi]} (optionally log: true), or "
                       "{choice: [v1, v2, ...]}; `when: {other.key: value}` samples the key "
                       "only where a choice listed earlier took that value (Optuna only)",
        "oneOf": [{"required": ["float"]}, {"required": ["int"]}, {"required": ["choice"]}]})

    float_: list[float] | None = Field(None, alias="float", min_length=2, max_length=2)
    int_: list[int] | None = Field(None, alias="int", min_length=2, max_length=2)
    choice: list[Any] | None = Field(None, min_length=1)
    log: bool = False
    when: dict[str, Any] | None = None


def searched_keys(keys: tuple[str, ...]) -> Any:
    """The type of ``search.space``: taken as written (the spec parses it, naming each bad
    key), described to editors as {one of ``keys``: a :class:`Domain`}."""
    names = Literal[keys] if keys else str  # type: ignore[valid-type]
    return Annotated[Any, PlainValidator(
        lambda v: v, json_schema_input_type=dict[names, Domain] | None)]  # type: ignore[valid-type]


class Search(Section):
    algorithm: Literal["optuna", "random", "grid"] = Choice("optuna")
    metric: str = Field("val/worst_group_acc", min_length=1, json_schema_extra={
        "x-searchable": False, "x-expected": "a selection metric",
        "examples": ["val/worst_group_acc", "val/avg_acc", "val/unbiased_acc",
                     "val/weighted_acc", "val/worst_class_acc", "val/worst_pseudo_group_acc"]})
    mode: Literal["max", "min"] = Choice("max")
    num_samples: int = Int(1, 1, 100_000, doc="search trials per target (and per method)")
    max_concurrent: int | None = Int(None, 1, 100_000, doc="running trials per pipeline")
    max_concurrent_total: int | None = Int(None, 1, 100_000,
                                           doc="running trials of the whole sweep")
    seed: int = Int(0, 0, MAX_SEED, doc="the sampler's seed")
    startup_trials: int | None = Int(
        None, 1, 100_000, doc="optuna: TPE's random start-up trials per pipeline before its "
                              "model-based ones; default a third of num_samples (2 to 10)")
    trial_seed: int = Int(
        1000, 0, MAX_SEED,
        doc="the seed every search trial trains with; never one of `seeds`, so the "
            "reported seeds are fresh runs, not the search's own trials")
    space: searched_keys(()) = None  # type: ignore[valid-type]
    _domains: tuple[SearchDomain, ...] = PrivateAttr(())

    @property
    def domains(self) -> tuple[SearchDomain, ...]:
        """``space`` parsed: the searched keys and their distributions."""
        return self._domains

    def with_domains(self, domains: tuple[SearchDomain, ...]) -> Search:
        out = self.model_copy()
        out._domains = domains
        return out


class Selection(Section):
    """How a trial picks its epoch or grid point: the search's metric and mode, which a trial
    carries so it selects by the same rule the search ranks trials by."""

    metric: str = Text("val/worst_group_acc", expected="a selection metric")
    mode: Literal["max", "min"] = Choice("max")


class Asha(Section):
    grace_period: int = Int(1, 1)
    reduction_factor: Number = Float(3.0, 1, lo_open=True)


#: What ``scheduler:`` may be, for a user who wrote something else.
SCHEDULER_FORM = "null or {asha: {grace_period: INT, reduction_factor: NUMBER}}"


class Scheduler(Section):
    """Early stopping of search trials (``scheduler: null`` or ``none``: none)."""

    model_config = ConfigDict(json_schema_extra={"x-expected": SCHEDULER_FORM})

    asha: Asha


class Resources(Section):
    cpu: Number = Float(1.0, 0, lo_open=True)
    gpu: Number = Float(0.0, 0)


class Tracking(Section):
    uri: str = Text("sqlite:///mlflow.db", expected="a tracking URI (sqlite:///file.db, "
                                                    "http://host:port, ...)")


class Cache(Section):
    """Where on-disk datasets' decoded images live (debias/data/decoded.py). ``shared``: in
    the sweep's storage, built once for the cluster (right when storage is local or fast);
    ``local``: on each node's own disk (``local_dir``, e.g. /tmp or an NVMe mount), built
    once per node, so an epoch never reads over the network (CelebA at 224 px is ~40 GB);
    ``off``: decode every image with PIL each epoch."""

    decoded: Literal["shared", "local", "off"] = Choice("shared", searchable=False)
    local_dir: str = Text("/tmp/debias-cache", expected="a folder on each node's own disk")

    def decoded_dir(self, stage_cache: str | Path) -> Path | None:
        """Where the decoded images live, given the sweep's stage cache (``<storage>/cache``):
        there (shared), under ``local_dir`` (local), or nowhere (off: PIL each epoch)."""
        if self.decoded == "off":
            return None
        return Path(self.local_dir).expanduser() if self.decoded == "local" else Path(stage_cache)


class Debug(Section):
    """Fault injection, to check on a real cluster that a crashed trial resumes."""

    fail_once_at_epoch: int | None = Int(None, 1, searchable=False)
    #: Trials with this seed crash after epoch `fail_once_at_epoch` (default 1) on every
    #: attempt: a persistent bug, to check that it is recorded and the others carry on.
    fail_seed: int | None = Int(None, 0, MAX_SEED, searchable=False)
    #: Trials whose train.lr is this crash after epoch `fail_once_at_epoch` (default: their
    #: last) on every attempt, after reporting it: a lucky score followed by a crash.
    fail_lr: Number | None = Float(None, 0, lo_open=True, searchable=False)
    #: Every trial meets a DatasetError as it starts: a deterministic failure, which must end
    #: the trial at once with its cause instead of being retried.
    bad_data: bool = Flag(False)
    #: Search trials wait as they start (up to 5 minutes) until this many of their pipeline
    #: have started: forces them to run at once, e.g. on different nodes of a test cluster,
    #: where a warm worker would otherwise take them one after another.
    start_together: int | None = Int(None, 2, searchable=False)


#: Sections every sweep has (besides the methods' own), in file order.
SECTIONS: dict[str, type[Section]] = {
    "dataset": Dataset, "backbone": Backbone, "train": Train, "reference": Reference,
    "search": Search, "resources": Resources, "tracking": Tracking, "cache": Cache,
    "debug": Debug,
}
#: Sections whose keys a search may vary, for every method of a sweep.
SHARED_SEARCHABLE = {"train": Train, "backbone": Backbone}

#: Selection metrics every method reports on validation. The last needs no bias labels.
SELECTION_METRICS = (
    "val/worst_group_acc",
    "val/avg_acc",
    "val/unbiased_acc",
    "val/weighted_acc",
    "val/worst_class_acc",
)
#: Metrics that select without reading any bias label (of validation or elsewhere).
LABEL_FREE_METRICS = ("val/avg_acc", "val/worst_class_acc", "val/worst_pseudo_group_acc")
