"""The sweep file as one typed model: every key, its default, and the rules between keys.

:class:`SweepFile` is validated once, where the file enters (:func:`debias.spec.validate`),
and everything downstream reads it typed. Its sections are :mod:`debias.sections`; the rules
that relate keys to one another, or to this machine (targets of the dataset, a bias other than
the target, weights and storage on disk, the search space's keys), are its validators, each
failing with finished problem lines that name the key path, the value and what is allowed.

The rules that depend on the methods (their sections, their searchable keys, their checks)
need the registry, which this module does not import: :func:`debias.spec.sweep_model`
attaches each method's ``Params`` as a section and adds those rules, and validation passes
the loaded methods in pydantic's validation context (``methods``, ``names``, ``sections``,
``cwd``). Without ``methods`` (a method that did not load), their rules are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from debias.data import DatasetError, check_pair, dataset_attributes
from debias.params import (
    SearchDomain,
    Section,
    check_value,
    choice_values,
    defer,
    did_you_mean,
    field_kind,
    refuse,
    searchable,
    show,
)
from debias.sections import (
    MAX_SEED,
    SCHEDULER_FORM,
    SHARED_SEARCHABLE,
    Backbone,
    Cache,
    Dataset,
    Debug,
    Reference,
    Resources,
    Scheduler,
    Search,
    Tracking,
    Train,
)

__all__ = ["SYSTEM_FOLDERS", "SYSTEM_TREES", "SweepFile", "absolute"]

#: ``storage`` may not be one of these folders (Ray's results, checkpoints and the stage
#: cache would be written into the system), nor lie inside those of ``SYSTEM_TREES``.
SYSTEM_FOLDERS = ("/", "/home", "/var", "/opt", "/srv", "/mnt", "/media", "/run", "/root")
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/sbin", "/sys", "/usr")
_DOMAIN_FORM = ("{float: [lo, hi]}, {int: [lo, hi]} (optionally log: true) or {choice: [v1, "
                "v2, ...]}")


def absolute(value: str, cwd: Path) -> Path:
    """A path of the file, absolute: relative paths resolve against ``cwd``."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (cwd / p).resolve()


def _cwd(info: ValidationInfo) -> Path:
    return (info.context or {}).get("cwd") or Path.cwd()


def _listed(value: Any) -> Any:
    """``targets: Blond_Hair`` means ``[Blond_Hair]``; a list of distinct names."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value) \
            or not all(isinstance(t, str) and t for t in value):
        raise ValueError("bad targets")
    return value


def _seeds(value: Any) -> Any:
    if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value) or \
            any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED
                for s in value):
        raise ValueError("bad seeds")
    return value


def _attributes(dataset: Dataset, info: ValidationInfo) -> tuple[tuple[str, ...], list[str]]:
    """The dataset's attributes (a metadata CSV's columns: its header says which), and the
    problem reading them; read once per validation (the targets' and the bias's rules both
    ask), remembered in the validation context."""
    memo = (info.context or {}).get("attributes")
    if memo is not None and memo[0] == dataset:
        return memo[1], list(memo[2])
    try:
        if dataset.name == "metadata" and dataset.root is None:
            known: tuple[str, ...] = ()  # its columns are unknown until root names its folder
        elif dataset.name == "metadata":
            known = dataset_attributes(dataset.name, dataset.model_dump())
        else:
            known = dataset_attributes(dataset.name)
        lines: list[str] = []
    except DatasetError as exc:
        known, lines = (), [f"dataset.file: {exc}"]
    if info.context is not None:
        info.context["attributes"] = (dataset, known, lines)
    return known, list(lines)


def _expected(key: str, value: Any, expected: str) -> str:
    return f"{key}: got {show(value)}; expected {expected}"


class SweepFile(Section):
    """A sweep file, typed: what ``launch.py SWEEP.yaml`` runs."""

    model_config = ConfigDict(title="debias-sweep sweep file",
                              json_schema_extra={"not": {"required": ["method", "methods"]}})

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
                      description="names the MLflow experiment", json_schema_extra={
                          "x-expected": "a name of letters, digits, '_', '.', '-' (it names "
                                        "the MLflow experiment)"})
    #: One method, or a study's (checked against the registry before the file is validated).
    method: Any = "erm"
    methods: Any = None
    dataset: Dataset = Field(..., json_schema_extra={
        "x-missing": " (e.g. dataset: {name: synthetic})"})
    targets: Annotated[list[str], BeforeValidator(
        _listed, json_schema_input_type=str | list[str])] = Field(
        ..., description="one search per target attribute", json_schema_extra={
            "x-expected": "a non-empty list of distinct attribute names"})
    bias_attribute: str | dict[str, str] = Field(
        ..., description="defines the evaluation groups (or a map per target)",
        json_schema_extra={"x-expected": "an attribute name or a map {target: attribute}",
                           "x-missing": " (the attribute that defines evaluation groups, e.g. "
                                        "Male for CelebA, Place for Waterbirds)"})
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], BeforeValidator(_seeds)] = Field(
        [0], min_length=1, description="the best config per target is re-run fresh with each "
        "seed", json_schema_extra={"uniqueItems": True, "x-expected": "a non-empty list of "
                                   f"integers in 0..{MAX_SEED}, all distinct (e.g. [0, 1, 2])"})
    backbone: Backbone = Backbone()
    train: Train = Train()
    reference: Reference = Reference()
    search: Search = Search()
    scheduler: Scheduler | None = Field(None, json_schema_extra={"x-expected": SCHEDULER_FORM})
    resources: Resources = Resources()
    tracking: Tracking = Tracking()
    cache: Cache = Cache()
    storage: str = Field("debias_results", min_length=1)
    max_failures: int = Field(2, ge=0, le=100, strict=True)
    debug: Debug = Debug()

    @field_validator("dataset", "backbone", "train", "reference", "search", "resources",
                     "tracking", "cache", "debug", mode="before")
    @classmethod
    def _empty_is_default(cls, value: Any) -> Any:
        return {} if value is None else value  # `train:` with nothing under it

    @field_validator("scheduler", mode="before")
    @classmethod
    def _no_scheduler(cls, value: Any) -> Any:
        return None if value in (None, "none", {}) else value

    @field_validator("dataset")
    @classmethod
    def _root(cls, dataset: Dataset, info: ValidationInfo) -> Dataset:
        if dataset.root is None:
            return dataset
        return dataset.model_copy(update={"root": str(absolute(dataset.root, _cwd(info)))})

    @field_validator("targets")
    @classmethod
    def _of_the_dataset(cls, targets: list[str], info: ValidationInfo) -> list[str]:
        dataset = info.data.get("dataset")
        if dataset is None:
            return targets
        known, lines = _attributes(dataset, info)
        lines += [_expected(f"targets[{i}]", t, f"an attribute of {dataset.name}"
                            f"{did_you_mean(t, known)}: {', '.join(known)}")
                  for i, t in enumerate(targets) if known and t not in known]
        if lines:
            defer(info, *lines)  # the bias can still be checked against each target
        return targets

    @field_validator("bias_attribute", mode="before")
    @classmethod
    def _a_bias_per_target(cls, bias: Any, info: ValidationInfo) -> Any:
        dataset, targets = info.data.get("dataset"), info.data.get("targets")
        if dataset is None or targets is None or not isinstance(bias, str | dict):
            return bias  # the form is checked by the type
        known, lines = _attributes(dataset, info)
        if isinstance(bias, dict):
            if extra := sorted(set(bias) - set(targets)):
                lines.append(_expected("bias_attribute", bias, f"keys that are targets; {extra} "
                                       "are not in targets"))
            if missing := [t for t in targets if t not in bias]:
                lines.append(_expected("bias_attribute", bias, "a bias for every target; "
                                       f"missing {missing}"))
        pairs = {t: bias.get(t) for t in targets if t in bias} if isinstance(bias, dict) \
            else dict.fromkeys(targets, bias)
        for t, b in pairs.items():
            path = f"bias_attribute.{t}" if isinstance(bias, dict) else "bias_attribute"
            if not isinstance(b, str) or (known and b not in known):
                lines.append(_expected(path, b, f"an attribute of {dataset.name}"
                                       f"{did_you_mean(b, known)}: {', '.join(known)}"))
            elif b == t:
                lines.append(_expected(path, b, f"an attribute other than the target {t!r}"))
            elif known and t in known and (
                    reason := check_pair(dataset.name, t, b, dataset.model_dump())):
                lines.append(_expected(path, b, reason))
        if lines:
            refuse(*lines)
        return bias

    @field_validator("backbone")
    @classmethod
    def _weights(cls, backbone: Backbone, info: ValidationInfo) -> Backbone:
        weights = backbone.weights
        if weights == "imagenet" and backbone.arch.startswith("small_cnn"):
            refuse("backbone.weights: got 'imagenet'; expected 'none' or a path for arch "
                   f"{backbone.arch} (torchvision has no ImageNet weights for it)")
        if weights in ("none", "imagenet"):
            return backbone
        path = absolute(weights, _cwd(info))
        if not path.is_file():
            refuse(f"backbone.weights: got {weights!r}; expected 'imagenet', 'none' or an "
                   f"existing state_dict file (looked at {path})")
        return backbone.model_copy(update={"weights": str(path)})

    @field_validator("search")
    @classmethod
    def _space(cls, search: Search, info: ValidationInfo) -> Search:
        """``search.space`` parsed into :class:`SearchDomain` s (once the methods, whose
        sections hold searchable keys, are loaded)."""
        context = info.context or {}
        if context.get("methods") is None:
            return search
        return search.with_domains(_parse_space(search, context))

    @field_validator("tracking")
    @classmethod
    def _sqlite_file(cls, tracking: Tracking, info: ValidationInfo) -> Tracking:
        """sqlite:///rel.db is relative to the CWD: pinned, so Ray workers and later runs
        agree."""
        prefix = "sqlite:///"
        uri = tracking.uri
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            uri = prefix + str(absolute(uri[len(prefix):], _cwd(info)))
        return tracking.model_copy(update={"uri": uri})

    @field_validator("storage")
    @classmethod
    def _own_folder(cls, value: str, info: ValidationInfo) -> str:
        """``storage`` is a folder of the user's, not a system folder (links followed)."""
        path = absolute(value, _cwd(info))
        real = path.resolve()
        if str(real) in SYSTEM_FOLDERS or any(real == Path(t) or Path(t) in real.parents
                                              for t in SYSTEM_TREES):
            refuse(f"storage: got {value!r} ({real}); expected a folder of your own (e.g. "
                   "~/debias_results), not a system folder: the sweep writes Ray's results, "
                   "checkpoints and the stage cache there")
        return str(path)

    @model_validator(mode="after")
    def _fresh_seeds(self) -> SweepFile:
        """Reported seeds are fresh runs: never the seed the search's trials trained with."""
        if self.search.trial_seed in self.seeds:
            refuse(_expected("seeds", self.seeds, "seeds other than search.trial_seed "
                             f"({self.search.trial_seed}): the seeds phase re-runs the best "
                             "config fresh, never the search's own trial; change one of them"))
        return self

    @property
    def method_names(self) -> list[str]:
        """The ``method:`` values of the sweep (a study's in order), as written."""
        return [str(m) for m in self.methods] if self.methods is not None else [str(self.method)]


def _parse_space(search: Search, context: Mapping[str, Any]) -> tuple[SearchDomain, ...]:
    """Every key of ``search.space``: searchable by a method this sweep runs, a well-formed
    distribution of the key's own values, its condition on a choice listed earlier."""
    space = search.space if search.space is not None else {}
    if not isinstance(space, dict):
        refuse(_expected("search.space", space, "a mapping {dotted.key: {float|int: [lo, hi]} "
                         "| {choice: [..]}}"))
    sections: dict[str, type[Section]] = dict(SHARED_SEARCHABLE)
    sections.update({c.section: c.Params for c in context["methods"] if c.section})
    other = {s: c for s, c in context["sections"].items() if s not in sections}
    lines: list[str] = []
    domains: list[SearchDomain] = []
    for key, dom in space.items():
        where = f"search.space.{key}"
        sec, _, leaf = str(key).partition(".")
        model = sections.get(sec)
        info = model.model_fields.get(leaf) if model else None
        if model is None or info is None or not searchable(info):
            if sec in other and leaf in other[sec].Params.model_fields:
                lines.append(f"{where}: a key of method {other[sec].name}, which this sweep "
                             f"does not run (methods: {', '.join(context['names'])})")
                continue
            allowed = [f"{s}.{k}" for s, m in sections.items() for k, fi in m.model_fields.items()
                       if searchable(fi)]
            lines.append(f"{where}: not a searchable key{did_you_mean(key, allowed)}; allowed: "
                         f"{', '.join(allowed)}")
            continue
        when = dom.get("when") if isinstance(dom, dict) else None
        if isinstance(dom, dict):
            dom = {k: v for k, v in dom.items() if k != "when"}
        if parsed := _parse_domain(where, dom, model, leaf, search.algorithm == "grid", lines):
            conditions = _parse_when(where, when, domains, search.algorithm, lines)
            domains.append(SearchDomain(path=str(key), when=conditions, **parsed))
    if search.algorithm == "grid" and not domains:
        lines.append("search.algorithm: got 'grid'; expected a search.space with at least one "
                     "{choice: [...]} key")
    if lines:
        refuse(*lines)
    return tuple(domains)


def _parse_when(where: str, when: Any, earlier: list[SearchDomain], algorithm: str,
                lines: list[str]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """`when: {other.key: value | [values]}`: a condition on choice keys listed earlier."""
    if when is None:
        return ()
    choices = {d.path: d.values for d in earlier if d.kind == "choice"}
    if algorithm != "optuna":
        lines.append(_expected(f"{where}.when", when, "no condition unless search.algorithm "
                               "is optuna (conditional spaces are sampled define-by-run by "
                               "Optuna)"))
        return ()
    if not isinstance(when, dict) or not when:
        lines.append(_expected(f"{where}.when", when, "a mapping {other.searched.key: value "
                               "or [values]}"))
        return ()
    out = []
    for key, value in when.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if key not in choices:
            lines.append(_expected(f"{where}.when.{key}", value, "a condition on a {choice: "
                                   f"[...]}} key listed earlier in search.space "
                                   f"({', '.join(choices) or 'none so far'})"))
        elif unknown := [v for v in values if v not in choices[key]]:
            lines.append(_expected(f"{where}.when.{key}", value,
                                   f"values among {list(choices[key])}, not {unknown}"))
        else:
            out.append((str(key), values))
    return tuple(out)


def _parse_domain(where: str, dom: Any, model: type[Section], leaf: str, grid: bool,
                  lines: list[str]) -> dict[str, Any] | None:
    kinds = [k for k in ("float", "int", "choice") if k in dom] if isinstance(dom, dict) else []
    if len(kinds) != 1 or set(dom) - {"float", "int", "choice", "log"}:
        lines.append(_expected(where, dom, _DOMAIN_FORM))
        return None
    kind, values = kinds[0], dom[kinds[0]]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            lines.append(_expected(where, values, "a non-empty list of values for choice"))
            return None
        checked = [check_value(model, leaf, v) for v in values]
        bad = [_expected(f"{where}.choice[{i}]", v, expected)
               for i, (v, (_, expected)) in enumerate(zip(values, checked, strict=True))
               if expected is not None]
        lines.extend(bad)
        return None if bad else {"kind": "choice", "values": tuple(v for v, _ in checked)}
    info = model.model_fields[leaf]
    numeric = field_kind(info)
    problem = None
    if grid:
        problem = (where, dom, "{choice: [...]} (the grid algorithm enumerates choices only)")
    elif numeric is None or choice_values(info) is not None or (kind == "float"
                                                                 and numeric == "int"):
        problem = (where, dom, f"{{choice: [...]}}{' or {int: [lo, hi]}' if numeric else ''} "
                               "for this key")
    elif not isinstance(values, list) or len(values) != 2:
        problem = (f"{where}.{kind}", values, "a range [lo, hi]")
    if problem:
        lines.append(_expected(*problem))
        return None
    ends = [check_value(model, leaf, v) for v in values]
    (lo, lo_bad), (hi, hi_bad) = ends
    log = dom.get("log", False)
    if lo_bad or hi_bad:
        problem = (f"{where}.{kind}", values, f"ends that are each {lo_bad or hi_bad}")
    elif not isinstance(log, bool):
        problem = (f"{where}.log", log, "true or false")
    elif not lo < hi:
        problem = (f"{where}.{kind}", values, "a non-empty range with lo < hi")
    elif log and lo <= 0:
        problem = (f"{where}.{kind}", values, "a range with lo > 0 for log: true")
    if problem:
        lines.append(_expected(*problem))
        return None
    return {"kind": kind, "low": lo, "high": hi, "log": log}
