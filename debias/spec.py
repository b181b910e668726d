"""The only place that validates a sweep file.

A sweep file is one typed model, :class:`debias.sweep_file.SweepFile`, whose sections are
:mod:`debias.sections` and whose methods' sections are their ``Params``, attached from the
one registry (:mod:`debias.methods`) by :func:`sweep_model`; the rules between keys are its
validators. The same model is the JSON Schema editors use (``launch.py --schema``).

Everything downstream receives a validated :class:`Spec` and reads it typed
(``spec.train.epochs``), never re-checking user input; a trial receives its settings as a
:class:`debias.trial_config.TrialConfig`. Validation collects the problems of the file and
raises one :class:`SpecError` whose lines each name the key path, the bad value and what is
allowed, so a user fixes a file in few round trips and nothing starts on an invalid file.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    model_validator,
)

from debias.data import GroupedDataset, load_grouped
from debias.methods import (
    Method,
    MethodLoadError,
    known_methods,
    method_sections,
    resolve_method,
    static_load_problem,
)
from debias.methods.base import SweepContext
from debias.params import SearchDomain, Section, did_you_mean, problems_of, refuse, searchable, show
from debias.sections import (
    LABEL_FREE_METRICS,
    MAX_SEED,
    SELECTION_METRICS,
    SHARED_SEARCHABLE,
    Asha,
    Backbone,
    Cache,
    Dataset,
    Resources,
    Search,
    Tracking,
    Train,
    searched_keys,
)
from debias.sweep_file import SweepFile
from debias.sweep_yaml import (
    MAX_SWEEP_BYTES,
    YAMLRefused,
    decode_utf8,
    load_yaml,
    unshared,
    yaml_problem,
)

__all__ = [
    "LABEL_FREE_METRICS",
    "MAX_SEED",
    "PIPELINE_KEYS",
    "SELECTION_METRICS",
    "SearchDomain",
    "Spec",
    "SpecError",
    "config_hash",
    "load_spec",
    "parse_overrides",
    "sweep_model",
    "trial_config",
    "validate",
    "with_params",
]


class SpecError(ValueError):
    """A sweep file (or --set override) that cannot run; the message lists every problem."""

    def __init__(self, problems: list[str], source: str = "sweep file") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class Spec:
    """A validated sweep: the typed file (defaults filled, paths absolute) and what the
    plan must say about how it came to be."""

    file: SweepFile
    source: str = "<memory>"
    #: The ``--set KEY=VALUE`` overrides applied to the file, so commands printed for the
    #: user (``--annotate``, ``--resume``) reproduce them.
    overrides: tuple[str, ...] = ()
    #: What the plan must tell the user about how the file and the overrides combined
    #: (search keys dropped by ``--set methods=[...]``, a ``--set`` of a searched key).
    notes: tuple[str, ...] = ()
    #: Strings that came from environment variables: {dotted key: the file's text before
    #: expansion}, e.g. ``{"dataset.root": "${DEBIAS_DATA:-data}/celeba"}``.
    env_sources: dict[str, str] = field(default_factory=dict)

    def env_note(self, key: str) -> str:
        """Where a value that came from the environment came from, for an error about it:
        `` (dataset.root is '${DEBIAS_DATA:-data}/celeba' in the sweep file; DEBIAS_DATA is
        not set, so its default 'data' was used)``; "" for a value written out in the file."""
        template = self.env_sources.get(key)
        if not template:
            return ""
        parts = []
        for m in _ENV.finditer(template):
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                parts.append(f"{name}={os.environ[name]!r}")
            elif default is not None:
                parts.append(f"{name} is not set, so its default {default!r} was used")
            else:
                parts.append(f"{name} is not set, so it expanded to ''")
        names = sorted({m.group(1) for m in _ENV.finditer(template)})
        return (f" ({key} is {template!r} in the sweep file; {'; '.join(parts)}; set "
                f"{' and '.join(names)} to point it at your data, e.g. "
                f"`export {names[0]}=/path/to/datasets`)")

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """The resolved file as plain values (what a trial's Tune config is built from): the
        sections the sweep has, without ``search.space`` (its domains are :attr:`space`)."""
        out = self.file.model_dump(exclude={"method", "methods"})
        out = {k: v for k, v in out.items() if v is not None or k in SweepFile.model_fields}
        out["search"].pop("space", None)
        return {"methods": self.methods, "study": self.is_study, **out}

    @property
    def space(self) -> tuple[SearchDomain, ...]:
        return self.file.search.domains

    @property
    def dataset(self) -> Dataset:
        return self.file.dataset

    @property
    def backbone(self) -> Backbone:
        return self.file.backbone

    @property
    def train(self) -> Train:
        return self.file.train

    @property
    def search(self) -> Search:
        return self.file.search

    @property
    def resources(self) -> Resources:
        return self.file.resources

    @property
    def cache(self) -> Cache:
        return self.file.cache

    @property
    def asha(self) -> Asha | None:
        """ASHA's settings, or None without early stopping (``scheduler: null``)."""
        return self.file.scheduler.asha if self.file.scheduler else None

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def max_failures(self) -> int:
        return self.file.max_failures

    @property
    def methods(self) -> list[str]:
        """The methods of the sweep: one, or a study's (``methods: [...]``), in order."""
        return self.file.method_names

    @property
    def method(self) -> str:
        """The sweep's method; a study names all of its methods joined with '+'."""
        return "+".join(self.methods)

    @property
    def is_study(self) -> bool:
        return self.file.methods is not None

    @property
    def targets(self) -> list[str]:
        return self.file.targets

    @property
    def seeds(self) -> list[int]:
        return self.file.seeds

    @property
    def search_seed(self) -> int:
        return self.search.trial_seed

    @property
    def storage(self) -> Path:
        return Path(self.file.storage)

    @property
    def tracking_uri(self) -> str:
        return self.file.tracking.uri

    def with_tracking_uri(self, uri: str) -> Spec:
        """The same sweep writing to ``uri`` (the one with its credentials unmasked)."""
        return dataclasses.replace(self, file=self.file.model_copy(
            update={"tracking": Tracking.model_construct(uri=uri)}))

    def bias_for(self, target: str) -> str:
        bias = self.file.bias_attribute
        return bias[target] if isinstance(bias, dict) else bias

    def load_data(self, target: str) -> GroupedDataset:
        """One target's (target, bias) view of the sweep's dataset (this process's copy)."""
        return load_grouped(self.dataset.model_dump(), target, self.bias_for(target))

    def method_class(self, method: str | None = None) -> type[Method]:
        return resolve_method(method or self.methods[0])

    def params_of(self, method: str | None = None) -> Section:
        cls = self.method_class(method)
        own = getattr(self.file, cls.section, None) if cls.section else None
        return own if own is not None else cls.Params.model_validate({})

    def space_for(self, method: str | None = None) -> tuple[SearchDomain, ...]:
        """The search domains that apply to one method: the shared ``train.*`` and
        ``backbone.*`` keys (``train.*`` only where the method trains by SGD) and the
        method's own section."""
        cls = self.method_class(method)
        train = any(cls.uses_train_knobs(p) for p in self.param_variants(method))
        keep = {"backbone", *(("train",) if train else ()), *((cls.section,) if cls.section
                                                             else ())}
        return tuple(d for d in self.space if d.path.partition(".")[0] in keep)

    def param_variants(self, method: str | None = None) -> list[Section]:
        """The method's params under each value of its searched choice keys (for rules such
        as 'ASHA needs epochs' that depend on a choice, e.g. slim.retrain)."""
        cls = self.method_class(method)
        variants = [self.params_of(method)]
        for d in self.space:
            sec, _, leaf = d.path.partition(".")
            if cls.section and sec == cls.section and d.kind == "choice":
                variants = [v.model_copy(update={leaf: value}) for v in variants
                            for value in d.values]
        return variants

    def values_of(self, path: str, method: str | None = None) -> set[Any]:
        """Every value a key can take in this sweep: its searched values, else the file's."""
        return self.context(method).values_of(path)

    def context(self, method: str | None = None) -> SweepContext:
        return SweepContext(self.file, self.space_for(method), self.params_of(method))

    def trial_base(self, target: str, method: str | None = None) -> dict[str, Any]:
        """The trial config before the search's values are applied: all a trainable needs.
        Its seed is the search's trial seed; the seeds phase replaces it."""
        c = self.config
        method = method or self.methods[0]
        cls = resolve_method(method)
        base = {
            "method": method,
            "dataset": c["dataset"],
            "target": target,
            "bias": self.bias_for(target),
            "seed": self.search_seed,
            "search_seed": self.search_seed,
            "backbone": c["backbone"],
            "train": c["train"],
            "reference": c["reference"],
            "selection": {"metric": self.search.metric, "mode": self.search.mode},
            "cache_dir": str(self.storage / "cache"),
            "cache": c["cache"],
            "debug": c["debug"],
        }
        if cls.section:
            base[cls.section] = self.params_of(method).model_dump()
        return copy.deepcopy(base)


def with_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted-path values (a search sample, a seed) to a trial config, returning a copy."""
    out = copy.deepcopy(dict(base))
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


#: Config keys the sweep's searcher adds to every trial's params (never hyperparameters): which
#: pipeline (``target`` or ``method/target``) and phase it belongs to, its Tune trial id, and
#: the sampler that drew its config.
PIPELINE_KEYS = ("pipeline", "phase", "trial", "sampler")


def trial_config(bases: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]
                 ) -> dict[str, Any]:
    """A trial's resolved config: its pipeline's base with the trial's own values applied."""
    return with_params(bases[params["pipeline"]],
                       {k: v for k, v in params.items() if k not in PIPELINE_KEYS})


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of a resolved trial config, so a changed knob never collides."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- loading


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    """`${VAR}` and `${VAR:-default}` in every string, so one file serves laptop and cluster."""
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """Parse `KEY=VALUE` strings; values are YAML so `targets=[A, B]` and `train.lr=1e-3` work.
    Values are loaded like the file: duplicate keys, alias bombs and text that is not UTF-8
    (an undecodable argument) are refused."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w./-]+)*", key.strip()):
            raise SpecError([f"--set {item!r}: expected KEY=VALUE with a dotted key, "
                             "e.g. --set train.epochs=2"], source="command line")
        key = key.strip()
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes the OS could not decode (surrogateescape)
            offset = len(raw[:exc.start].encode("utf-8", "surrogateescape"))
            raise SpecError([f"--set {key}: the value is not UTF-8 (byte offset {offset} of "
                             "the value); pass UTF-8 text"], source="command line") from None
        if not raw.strip():
            value: Any = ""
        else:
            try:
                value = load_yaml(raw)
            except yaml.YAMLError as exc:
                problem = (exc.problem if isinstance(exc, YAMLRefused)
                           else f"value {raw!r} is not valid YAML ({exc})")
                raise SpecError([f"--set {key}: {problem}"], source="command line") from None
            if value is None and not re.fullmatch(r"\s*(null|Null|NULL|~)\s*", raw):
                raise SpecError([f"--set {key}: the value {raw!r} is empty (only a comment); "
                                 f"write --set {key}=null for none, or quote a '#'"],
                                source="command line")
        out.append((key, value))
    return out


def _set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    # Keys under search.space are themselves dotted (train.lr): split only up to them.
    if key.startswith("search.space."):
        parts = ["search", "space", key[len("search.space."):]]
    else:
        parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    # Keys under search.space are themselves dotted (train.lr): split only up to them.
    if key.startswith("search.space."):
        parts = ["search", "space", key[len("search.space."):]]
    else:
        parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _read(path: Path) -> dict[str, Any]:
    """The file as a plain tree: UTF-8 YAML holding one mapping, at most 10 MiB, every key
    once, no alias bomb; each refusal one :class:`SpecError`."""
    def refused(problem: str) -> SpecError:
        return SpecError([problem], source=str(path))

    if not path.is_file():
        raise refused(f"{path}: no such sweep file")
    try:
        if path.stat().st_size > MAX_SWEEP_BYTES:
            raise refused(f"the file is {path.stat().st_size:,} bytes; a sweep file is a few "
                          f"kB (at most {MAX_SWEEP_BYTES:,} bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise refused(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = decode_utf8(data)
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise refused(yaml_problem(exc, text)) from None
    except ValueError as exc:
        raise refused(str(exc)) from None
    if raw is None:
        raise refused("the file is empty (nothing but whitespace, comments or null); expected "
                      "a mapping of keys (name, method, dataset, ...), e.g. "
                      "sweeps/quickstart.yaml")
    if not isinstance(raw, dict):
        raise refused(f"the file must be a mapping of keys (name, method, dataset, ...), got "
                      f"{type(raw).__name__}")
    return unshared(raw)


def load_spec(path: str | Path, overrides: Iterable[str] = (), cwd: Path | None = None) -> Spec:
    """Read, override, validate. Relative paths in the file resolve against the CWD."""
    path = Path(path)
    raw = _read(path)
    overrides = tuple(overrides)
    file_methods = [m for m, _ in _method_names(raw)]
    parsed = parse_overrides(overrides)
    for key, value in parsed:
        _set_path(raw, key, value)
    notes = _narrow_space(raw, file_methods, {key for key, _ in parsed})
    spec = validate(raw, source=str(path), cwd=cwd)
    searched = {d.path: d for d in spec.space}
    for item, (key, _) in zip(overrides, parsed, strict=True):
        if key in searched:
            text = item.partition("=")[2].strip()
            notes.append(f"--set {key}={text}: {key} is searched ({searched[key].describe()}), "
                         "so the search's values are used; to fix it, --set "
                         f"\"search.space.{key}={{choice: [{text}]}}\"")
    return dataclasses.replace(spec, overrides=overrides, notes=tuple(notes))


def _narrow_space(raw: dict[str, Any], file_methods: list[str], keys: set[str]) -> list[str]:
    """``--set methods=[...]`` running fewer of a study's methods: the search keys of the
    methods it no longer runs are dropped, and a note says which. (A key of a method the
    *file* never runs stays, and validation refuses it.)"""
    if "methods" not in keys or not isinstance(raw.get("methods"), list):
        return []
    now = {v for v, _ in _method_names(raw)}
    gone = [m for m in file_methods if m not in now]
    space = (raw.get("search") or {}).get("space") if isinstance(raw.get("search"), dict) \
        else None
    if not gone or not isinstance(space, dict):
        return []
    owner = {section: cls.name for section, cls in method_sections().items()}
    dropped = [k for k in list(space) if owner.get(str(k).partition(".")[0]) in gone
               and owner.get(str(k).partition(".")[0]) not in now]
    for key in dropped:
        del space[key]
    if not dropped:
        return []
    return [f"--set methods={raw['methods']}: {', '.join(gone)} not run, so "
            f"{'its' if len(gone) == 1 else 'their'} search key(s) "
            f"{', '.join(f'search.space.{k}' for k in dropped)} dropped"]


# --------------------------------------------------------------------------- validation


#: {model built by :func:`sweep_model`: (the methods it was built for, its field or None)}.
_BUILT: dict[type, tuple[tuple[type[Method], ...], str | None]] = {}


class _Pickled:
    """A model built by :func:`sweep_model` pickles as the methods it was built for and its
    state (its class exists only once built, so pickle could not find it by name)."""

    def __reduce__(self) -> tuple[Any, ...]:
        methods, field_name = _BUILT[type(self)]
        return _unpickle, (methods, field_name, self.__getstate__())  # type: ignore[attr-defined]


def _unpickle(methods: tuple[type[Method], ...], field_name: str | None, state: Any) -> Any:
    model = sweep_model(methods)
    cls = model.model_fields[field_name].annotation if field_name else model
    obj = cls.__new__(cls)  # type: ignore[union-attr]
    obj.__setstate__(state)
    return obj


@functools.cache
def sweep_model(methods: tuple[type[Method], ...] = ()) -> type[SweepFile]:
    """The sweep file's model with every registered method's section attached (plus those of
    ``methods``, which may be defined outside the registry); the sections of ``methods``
    are filled with their defaults when the file leaves them out. Its rules across the
    methods' keys are :func:`_method_rules`."""
    sections = {**method_sections(), **{c.section: c for c in methods if c.section}}
    models = {**SHARED_SEARCHABLE, **{s: c.Params for s, c in sections.items()}}
    keys = tuple(f"{s}.{k}" for s, model in models.items()
                 for k, info in model.model_fields.items() if searchable(info))
    name = {"anyOf": [{"enum": known_methods()}, {
        "type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        "description": "package.module:ClassName, a method defined outside the package"}]}
    run = {c.section for c in methods if c.section}
    search = create_model("Search", __base__=(Search, _Pickled), __module__=__name__,
                          space=(searched_keys(keys), None))
    model = create_model(  # type: ignore[call-overload]
        "SweepFile", __base__=(SweepFile, _Pickled), __module__=__name__,
        __validators__={"_method_rules": model_validator(mode="after")(_method_rules)},
        method=(Annotated[Any, WithJsonSchema({**name, "description":
                                               "the method (or `methods: [...]` for a study)"})],
                "erm"),
        methods=(Annotated[Any, WithJsonSchema({
            "type": "array", "items": name, "minItems": 1, "uniqueItems": True,
            "description": "a study: every method gets the same search budget"})], None),
        search=(search, search()),
        **{s: ((c.Params, Field({}, validate_default=True)) if s in run else
               (c.Params | None, Field(None, description=f"method {c.name}: {c.summary}")))
           for s, c in sections.items()})
    _BUILT.update({model: (methods, None), search: (methods, "search")})
    return model  # type: ignore[no-any-return]


def _method_rules(file: SweepFile, info: ValidationInfo) -> SweepFile:
    """The rules that need the methods: the selection metric each reports, each method's own
    :meth:`Method.check`, no idle ``train.*`` search, ASHA only over epochs."""
    methods = (info.context or {}).get("methods")
    if not methods or (info.context or {}).get("deferred"):
        return file  # a method's rules may read any key: only on a file valid key by key
    spec = Spec(file=file)
    problems = [f"search.metric: got {show(file.search.metric)}; expected one of "
                f"{', '.join(SELECTION_METRICS + cls.extra_selection_metrics)} for method "
                f"{cls.name}" for cls in methods
                if file.search.metric not in SELECTION_METRICS + cls.extra_selection_metrics]
    if problems:
        refuse(problems[0])
    for name in file.method_names:
        ctx = spec.context(name)
        resolve_method(name).check(ctx)
        problems.extend(ctx.problems)
    train_keys = [d.path for d in spec.space if d.path.startswith("train.")]
    if train_keys and not spec.is_study and not any(
            d.path.startswith("train.") for d in spec.space_for(spec.methods[0])):
        problems.append(f"search.space: {', '.join(train_keys)} searched, but method "
                        f"{spec.methods[0]} trains no SGD epochs here (its trial is a grid of "
                        "logistic regressions on frozen features); expected no train.* keys "
                        "(SGD's knobs would not change a thing)")
    _check_asha(spec, problems)
    if problems:
        refuse(*problems)
    return file


def validate(raw: Mapping[str, Any], source: str = "sweep file", cwd: Path | None = None) -> Spec:
    """Check every key; return a resolved Spec or raise one SpecError listing all problems."""
    cwd = cwd or Path.cwd()
    env_sources = _env_sources(raw)
    raw = _expand_env(copy.deepcopy(dict(raw)))
    problems: list[str] = []

    def bad(path: str, value: Any, expected: str) -> None:
        problems.append(f"{path}: got {show(value)}; expected {expected}")

    if plugins := _module_paths(raw):
        # Importing a module runs its code: only for a file that is otherwise valid.
        _, found = _validated(sweep_model(), raw, cwd, None)
        static = [f"{where}: {problem}" for value, where in _method_names(raw)
                  if isinstance(value, str) and (problem := static_load_problem(value))]
        if found or static:
            late = [] if static else [f"method: {', '.join(plugins)} not imported yet: "
                                      "importing runs the module's code, so that waits until "
                                      "the rest of the file is valid"]
            raise SpecError(list(dict.fromkeys(found + static + late)), source=source)
    methods = _check_methods(raw, problems, bad)
    file, found = _validated(sweep_model(tuple(methods)), raw, cwd, methods or None)
    problems.extend(found)
    if problems or file is None:
        raise SpecError(list(dict.fromkeys(problems)), source=source)
    return Spec(file=file, source=source, env_sources=env_sources)


def _validated(model: type[SweepFile], raw: Mapping[str, Any], cwd: Path,
               methods: list[type[Method]] | None) -> tuple[SweepFile | None, list[str]]:
    """The file under ``model``, or what is wrong with it (unknown top-level keys only once
    the methods, whose sections are top-level keys, are loaded)."""
    deferred: list[str] = []
    context = {"cwd": cwd, "methods": methods, "names": [v for v, _ in _method_names(raw)],
               "sections": method_sections(), "deferred": deferred}
    try:
        file = model.model_validate(raw, context=context)
    except ValidationError as exc:
        return None, deferred + problems_of(exc, model, raw, unknown_top_keys=methods is not None)
    return (None, deferred) if deferred else (file, [])


def _env_sources(raw: Any, prefix: str = "") -> dict[str, str]:
    """{dotted key: text} of every string holding a ``${VAR}`` before expansion."""
    if isinstance(raw, Mapping):
        out: dict[str, str] = {}
        for key, value in raw.items():
            out.update(_env_sources(value, f"{prefix}{key}."))
        return out
    if isinstance(raw, str) and _ENV.search(raw):
        return {prefix.rstrip("."): raw}
    return {}


def _method_names(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(value, key path) of every method the file names."""
    if "methods" in raw:
        value = raw["methods"]
        if isinstance(value, list):
            return [(str(v), f"methods[{i}]") for i, v in enumerate(value)]
        return []
    return [(str(raw.get("method", "erm")), "method")]


def _check_methods(raw: Mapping[str, Any], problems: list[str], bad: Any) -> list[type[Method]]:
    """The method classes a file names (``method:`` or a study's ``methods:``), loaded."""
    if "method" in raw and "methods" in raw:
        problems.append("method, methods: both given; expected exactly one (`method: NAME` "
                        "for one method, `methods: [NAME, ...]` for a study)")
        return []
    if "methods" in raw:
        value = raw["methods"]
        if not isinstance(value, list) or not value:
            bad("methods", value, "a non-empty list of method names")
            return []
        if len(set(map(str, value))) != len(value):
            bad("methods", value, "a list of distinct method names")
            return []
    out = []
    for value, where in _method_names(raw):
        if not isinstance(value, str):
            bad(where, value, "a method name")
            continue
        if (found := static_load_problem(value)) is not None:
            problems.append(f"{where}: {found}")
            continue
        try:
            out.append(resolve_method(value))
        except MethodLoadError as exc:
            if ":" in value:
                problems.append(f"{where}: {exc}")
            else:
                bad(where, value, f"one of {', '.join(known_methods())}"
                    f"{did_you_mean(value, known_methods())}, or package.module:ClassName")
    return out if len(out) == len(_method_names(raw)) else []


def _module_paths(raw: Mapping[str, Any]) -> list[str]:
    """The ``package.module:Class`` values a file names (not the registry's names)."""
    return [v for v, _ in _method_names(raw)
            if isinstance(v, str) and ":" in v and v not in known_methods()]


def _check_asha(spec: Spec, problems: list[str]) -> None:
    """ASHA stops trials at epoch milestones: it needs epochs, and enough of them."""
    asha = spec.asha
    if asha is None:
        return
    grace = asha.grace_period
    for method in spec.methods:
        cls = spec.method_class(method)
        kinds = {cls.trial_kind(p) for p in spec.param_variants(method)}
        if kinds != {"epochs"}:
            problems.append(f"scheduler: got ASHA; expected null when {method} can run "
                            "last-layer trials (their steps are points of the C x "
                            "class-weight grid, not epochs, so stopping early would skip grid "
                            "points, not epochs)")
    epochs = next((d for d in spec.space if d.path == "train.epochs"), None)
    schedules = next((set(d.values) for d in spec.space if d.path == "train.scheduler"),
                     {spec.train.scheduler})
    if epochs is not None and "cosine" in schedules:
        problems.append("scheduler: got ASHA with train.epochs searched and train.scheduler "
                        "cosine; expected one of them fixed (ASHA compares trials at equal "
                        "epochs, and a cosine schedule of fewer epochs has annealed further "
                        "by then, so short schedules would win the rungs)")
    fewest = spec.train.epochs if epochs is None else (
        min(epochs.values) if epochs.kind == "choice" else epochs.low)
    if epochs and grace > fewest:
        problems.append(f"scheduler.asha.grace_period: got {grace}; expected at most the fewest "
                        f"epochs a trial can have ({fewest})")
    elif not epochs and grace > spec.train.epochs:
        problems.append(f"scheduler.asha.grace_period: got {grace}; expected at most "
                        f"train.epochs ({spec.train.epochs})")


def _check_idle_train_keys(spec: Spec, problems: list[str]) -> None:
    """A single-method sweep that searches ``train.*`` for a method without SGD epochs would
    spend its budget on knobs that change nothing. (In a study the keys are shared: they
    apply to the methods that train by SGD.)"""
    if spec.is_study:
        return
    idle = [d.path for d in spec.space if d.path.startswith("train.")]
    if idle and not any(d.path.startswith("train.") for d in spec.space_for(spec.methods[0])):
        problems.append(f"search.space: {', '.join(idle)} searched, but method "
                        f"{spec.methods[0]} trains no SGD epochs here (its trial is a grid of "
                        "logistic regressions on frozen features); expected no train.* keys "
                        "(SGD's knobs would not change a thing)")
