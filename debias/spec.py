"""The only place that validates a sweep file.

Every section is a typed model (:mod:`debias.sections`, built with :mod:`debias.params`); a
method's own section is declared in the method's module (its ``Params``) and found through
the one registry (:mod:`debias.methods`). The same models generate the JSON Schema editors use
(``launch.py --schema``, ``sweeps/sweep.schema.json``).

Everything downstream receives a validated :class:`Spec`, whose sections it reads typed
(``spec.train.epochs``), and never re-checks user input; a trial receives its settings as a
:class:`debias.trial_config.TrialConfig`. Validation collects *every* problem in the file
and raises one :class:`SpecError` whose lines each name the key path, the bad value and what
is allowed, so a user fixes a file in one round trip and nothing starts on an invalid file.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from debias.data import (
    DATASETS,
    DatasetError,
    GroupedDataset,
    check_pair,
    dataset_attributes,
    load_grouped,
)
from debias.methods import Method, MethodLoadError, known_methods, resolve_method
from debias.methods.base import SweepContext
from debias.params import (
    SearchDomain,
    Section,
    check_section,
    check_value,
    choice_values,
    did_you_mean,
    field_kind,
    searchable,
    show,
)
from debias.sections import (
    DEFAULT_IMAGE_SIZE,
    LABEL_FREE_METRICS,
    MAX_SEED,
    METADATA_ONLY,
    SECTIONS,
    SELECTION_METRICS,
    SHARED_SEARCHABLE,
    SYNTHETIC_ONLY,
    Asha,
    Backbone,
    Cache,
    Dataset,
    Resources,
    Search,
    TopLevel,
    Train,
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
    "trial_config",
    "validate",
    "with_params",
]


#: ``storage`` may not be one of these folders (Ray's results, checkpoints and the stage
#: cache would be written into the system), nor lie inside those of ``SYSTEM_TREES``.
SYSTEM_FOLDERS = ("/", "/home", "/var", "/opt", "/srv", "/mnt", "/media", "/run", "/root")
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
                "/proc", "/sbin", "/sys", "/usr")


class SpecError(ValueError):
    """A sweep file (or --set override) that cannot run; the message lists every problem."""

    def __init__(self, problems: list[str], source: str = "sweep file") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")


def builtin_sections() -> dict[str, type[Method]]:
    """{section name: method} of every method the registry knows by name."""
    out = {}
    for name in known_methods():
        try:
            cls = resolve_method(name)
        except MethodLoadError:
            continue  # a broken plugin must not stop sweeps that do not use it
        if cls.section:
            out[cls.section] = cls
    return out


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class Spec:
    """A validated sweep: the resolved config (defaults filled, paths absolute)."""

    config: dict[str, Any]
    space: tuple[SearchDomain, ...] = field(default_factory=tuple)
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

    def _section(self, name: str) -> Any:
        """A shared section, typed (built once per Spec from its validated values)."""
        typed = self.__dict__.setdefault("_typed", {})  # a cache beside the frozen fields
        if name not in typed:
            typed[name] = SECTIONS[name].model_validate(self.config[name])
        return typed[name]

    @property
    def dataset(self) -> Dataset:
        return self._section("dataset")

    @property
    def backbone(self) -> Backbone:
        return self._section("backbone")

    @property
    def train(self) -> Train:
        return self._section("train")

    @property
    def search(self) -> Search:
        return self._section("search")

    @property
    def resources(self) -> Resources:
        return self._section("resources")

    @property
    def cache(self) -> Cache:
        return self._section("cache")

    @property
    def asha(self) -> Asha | None:
        """ASHA's settings, or None without early stopping (``scheduler: null``)."""
        scheduler = self.config.get("scheduler")
        return Asha.model_validate(scheduler["asha"]) if scheduler else None

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def max_failures(self) -> int:
        return self.config["max_failures"]

    @property
    def methods(self) -> list[str]:
        """The methods of the sweep: one, or a study's (``methods: [...]``), in order."""
        return list(self.config["methods"])

    @property
    def method(self) -> str:
        """The sweep's method; a study names all of its methods joined with '+'."""
        return "+".join(self.methods)

    @property
    def is_study(self) -> bool:
        return self.config.get("study", False)

    @property
    def targets(self) -> list[str]:
        return self.config["targets"]

    @property
    def seeds(self) -> list[int]:
        return self.config["seeds"]

    @property
    def search_seed(self) -> int:
        return self.search.trial_seed

    @property
    def storage(self) -> Path:
        return Path(self.config["storage"])

    @property
    def tracking_uri(self) -> str:
        return self.config["tracking"]["uri"]

    def bias_for(self, target: str) -> str:
        bias = self.config["bias_attribute"]
        return bias[target] if isinstance(bias, dict) else bias

    def load_data(self, target: str) -> GroupedDataset:
        """One target's (target, bias) view of the sweep's dataset (this process's copy)."""
        return load_grouped(self.dataset.model_dump(), target, self.bias_for(target))

    def method_class(self, method: str | None = None) -> type[Method]:
        return resolve_method(method or self.methods[0])

    def params_of(self, method: str | None = None) -> Section:
        return self.method_class(method).params_of(self.config)

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
        base = (self.config.get(cls.section) or {}) if cls.section else {}
        variants = [dict(base)]
        for d in self.space:
            sec, _, leaf = d.path.partition(".")
            if cls.section and sec == cls.section and d.kind == "choice":
                variants = [{**v, leaf: value} for v in variants for value in d.values]
        return [cls.Params.model_validate(v) for v in variants]

    def values_of(self, path: str, method: str | None = None) -> set[Any]:
        """Every value a key can take in this sweep: its searched values, else the file's."""
        return self.context(method).values_of(path)

    def context(self, method: str | None = None, cwd: Path | None = None) -> SweepContext:
        return SweepContext(self.config, self.space_for(method), self.params_of(method),
                            cwd=cwd or Path.cwd())

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
            "selection": {"metric": c["search"]["metric"], "mode": c["search"]["mode"]},
            "cache_dir": str(Path(c["storage"]) / "cache"),
            "cache": c["cache"],
            "debug": c["debug"],
        }
        if cls.section:
            base[cls.section] = c[cls.section]
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


#: A sweep file is a few hundred YAML nodes; anything near these is an accident or an attack.
_MAX_YAML_NODES = 100_000  # nodes after expanding every alias (counted, never expanded)
_MAX_YAML_DEPTH = 100  # nesting levels (a deeper document would exhaust Python's stack)
_MAX_SWEEP_BYTES = 10 * 1024 * 1024


class _YAMLRefused(yaml.YAMLError):
    """A document that parses but is refused (a duplicate key, an alias bomb); ``problem``
    is the whole message."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _key_path(segments: Iterable[str | None]) -> str:
    out = ""
    for s in segments:
        if s is not None:
            out += s if s.startswith("[") or not out else f".{s}"
    return out


def _at(mark: Any, same_line: bool = False) -> str:
    return f"line {mark.line + 1}" + (f", column {mark.column + 1}" if same_line else "")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (PyYAML keeps the last silently),
    recursive aliases, nesting deeper than ``_MAX_YAML_DEPTH`` and documents that would
    expand to more than ``_MAX_YAML_NODES`` nodes. Sizes are counted while composing: a
    node's size is 1 + its children's, an alias counts its anchor's size, memoized per node,
    so a billion-laughs file is refused after composing its few dozen nodes, and nothing
    downstream (``_expand_env``, the override paths, pydantic) ever walks an expansion."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> its expanded size (once composed)
        self._segments: list[str | None] = []  # the key path of the node being composed
        self._paths: dict[int, str] = {}  # id(mapping node) -> its key path
        self._pairs: dict[int, list[Any]] = {}  # id(mapping node) -> its own (key, value)s

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise _YAMLRefused(f"the alias *{event.anchor} at {_at(event.start_mark)} "
                                   "refers to a node that contains it (a recursive structure); "
                                   "expected a finite document")
        if len(self._segments) >= _MAX_YAML_DEPTH:
            raise _YAMLRefused(f"nested more than {_MAX_YAML_DEPTH} levels deep at "
                               f"{_at(self.peek_event().start_mark)}; a sweep file is a few "
                               "levels deep")
        if isinstance(index, yaml.ScalarNode):
            segment: str | None = str(index.value)
        elif isinstance(index, int):
            segment = f"[{index}]"
        else:  # the root, or a mapping key
            segment = None if index is None else "?"
        self._segments.append(segment)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._segments.pop()
        if id(node) in self._sizes:  # an alias: its anchor's size, already counted
            size = self._sizes[id(node)]
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
            self._pairs[id(node)] = list(node.value)  # before merge keys are flattened
            self._paths[id(node)] = _key_path([*self._segments, segment])
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(v)] for v in node.value)
        else:
            size = 1
        if size > _MAX_YAML_NODES:
            path = _key_path([*self._segments, segment])
            raise _YAMLRefused(
                f"{path + ' ' if path else ''}({_at(node.start_mark)}): the value expands to "
                f"more than {_MAX_YAML_NODES:,} nodes through YAML aliases (*name repeating "
                "&name); a sweep file has a few hundred: write the values out, or use fewer "
                "aliases")
        self._sizes[id(node)] = size
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in self._pairs.get(id(node), node.value):
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: keys given beside it override the merged ones
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base class refuses it
                if first is not key_node:
                    same = first.start_mark.line == key_node.start_mark.line
                    path = _key_path([self._paths.get(id(node)), str(key)])
                    raise _YAMLRefused(
                        f"{path}: duplicate key (at {_at(first.start_mark, same)} and again "
                        f"at {_at(key_node.start_mark, same)}); give each key once (YAML "
                        "would silently keep only the last)")
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    """One YAML document through :class:`_StrictLoader`; raises ``yaml.YAMLError``."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """A YAML error as one problem line: where, and what."""
    if isinstance(exc, _YAMLRefused):
        return exc.problem
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        return (f"YAML syntax error at line {line}: character #x{exc.character:04x} is not "
                "allowed in YAML (control characters other than tab and newline)")
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"YAML syntax error{where}: {problem}"


def _decode_utf8(data: bytes) -> str:
    """The file's text; raises ``ValueError(problem)`` naming the first byte that is not
    UTF-8."""
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        hint = (" (it starts with a UTF-16 byte-order mark)"
                if data[:2] in (b"\xff\xfe", b"\xfe\xff") else "")
        raise ValueError(f"the file is not UTF-8{hint}: byte {data[exc.start]:#04x} at byte "
                         f"offset {exc.start} (line {line}) ({exc.reason}); save it as "
                         "UTF-8") from None
    return text.removeprefix("\ufeff")


def _unshared(value: Any) -> Any:
    """A tree copy in which no two keys share a dict or list (YAML aliases share them, so
    ``--set train.lr=...`` would otherwise also change every key aliasing ``train``). Only
    after ``_StrictLoader`` has bounded the expanded size."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
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
                value = _load_yaml(raw)
            except yaml.YAMLError as exc:
                problem = (exc.problem if isinstance(exc, _YAMLRefused)
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


def load_spec(path: str | Path, overrides: Iterable[str] = (), cwd: Path | None = None) -> Spec:
    """Read, override, validate. Relative paths in the file resolve against the CWD.

    The file must be UTF-8 YAML holding one mapping; duplicate keys, alias bombs, an empty
    file and one over 10 MiB are refused, each as one :class:`SpecError`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such sweep file"], source=str(path))
    try:
        if path.stat().st_size > _MAX_SWEEP_BYTES:
            raise SpecError([f"the file is {path.stat().st_size:,} bytes; a sweep file is a few "
                             f"kB (at most {_MAX_SWEEP_BYTES:,} bytes)"], source=str(path))
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError([f"{path}: cannot be read ({exc.strerror or exc})"],
                        source=str(path)) from None
    try:
        text = _decode_utf8(data)
    except ValueError as exc:
        raise SpecError([str(exc)], source=str(path)) from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_problem(exc, text)], source=str(path)) from None
    if raw is None:
        raise SpecError(["the file is empty (nothing but whitespace, comments or null); "
                         "expected a mapping of keys (name, method, dataset, ...), e.g. "
                         "sweeps/quickstart.yaml"], source=str(path))
    if not isinstance(raw, dict):
        raise SpecError([f"the file must be a mapping of keys (name, method, dataset, ...), "
                         f"got {type(raw).__name__}"], source=str(path))
    raw = _unshared(raw)
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
    owner = {section: cls.name for section, cls in builtin_sections().items()}
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

FIXED_TOP_LEVEL = ("name", "method", "methods", "dataset", "targets", "bias_attribute",
                   "seeds", "backbone", "train", "reference", "search", "scheduler",
                   "resources", "tracking", "cache", "storage", "max_failures", "debug")


def validate(raw: Mapping[str, Any], source: str = "sweep file", cwd: Path | None = None) -> Spec:
    """Check every key; return a resolved Spec or raise one SpecError listing all problems."""
    cwd = cwd or Path.cwd()
    problems: list[str] = []
    env_sources = _env_sources(raw)
    raw = _expand_env(copy.deepcopy(dict(raw)))

    def bad(path: str, value: Any, expected: str) -> None:
        problems.append(f"{path}: got {show(value)}; expected {expected}")

    if _module_paths(raw) and _generic_problems(raw, problems):
        # Importing a module runs its code: only for a file that is otherwise valid.
        raise SpecError(list(dict.fromkeys(problems)), source=source)
    methods = _check_methods(raw, problems, bad)
    # A method that did not load owns a section nobody can check: say so once, not per key.
    unloaded = not methods
    method_sections = {**builtin_sections(), **{m.section: m for m in methods if m.section}}
    top_level = (*FIXED_TOP_LEVEL, *method_sections)
    for key in raw:
        if key not in top_level and not unloaded:
            problems.append(f"{key}: unknown key{did_you_mean(key, top_level)}; allowed: "
                            f"{', '.join(top_level)}")

    cfg: dict[str, Any] = {"methods": [m_name for m_name, _ in _method_names(raw)]
                           if methods else [], "study": "methods" in raw}
    top = check_section(TopLevel, {k: raw[k] for k in TopLevel.model_fields if k in raw},
                        "", problems)
    cfg.update(top.model_dump())
    if "dataset" not in raw:
        problems.append("dataset: missing; it is required (e.g. dataset: {name: synthetic})")
    for name, model in SECTIONS.items():
        cfg[name] = check_section(model, raw.get(name), name, problems).model_dump()
    cfg["search"].pop("space", None)
    _check_dataset(cfg["dataset"], problems, cwd)
    for section, cls in method_sections.items():
        if section in raw or cls in methods:
            cfg[section] = check_section(cls.Params, raw.get(section), section,
                                         problems).model_dump()
    cfg["scheduler"] = _check_scheduler(raw.get("scheduler"), problems, bad)

    _check_targets(cfg, raw, problems, bad)
    _check_weights(cfg, problems, cwd)
    _check_seeds(cfg, problems, bad)
    raw_space = ((raw.get("search") or {}) if isinstance(raw.get("search"), dict)
                 else {}).get("space") or {}
    space = _check_space(cfg, raw_space, methods, problems, bad) if methods else ()
    if methods and not problems:
        _check_metric(cfg, methods, bad)
        spec = Spec(config=cfg, space=space, source=source)
        for cls in methods:
            ctx = spec.context(cls_name(cfg, cls), cwd)
            cls.check(ctx)
            problems.extend(ctx.problems)
        _check_idle_train_keys(spec, problems)
        _check_asha(spec, problems)

    _check_storage_folder(cfg, problems, cwd)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)), source=source)
    cfg["storage"] = str(_absolute(cfg["storage"], cwd))
    cfg["tracking"]["uri"] = _absolute_tracking_uri(cfg["tracking"]["uri"], cwd)
    return Spec(config=cfg, space=space, source=source, env_sources=env_sources)


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


def cls_name(cfg: dict[str, Any], cls: type[Method]) -> str:
    """The ``method:`` value (name or module path) a class was loaded from."""
    for name in cfg["methods"]:
        if resolve_method(name) is cls:
            return name
    return cls.name


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
        if (found := _static_method_problem(value)) is not None:
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


def _generic_problems(raw: Mapping[str, Any], problems: list[str]) -> bool:
    """Check what does not depend on the methods (the top level, the shared sections);
    add what is wrong, with a line saying the module paths were not imported. True if
    something was."""
    found: list[str] = []
    check_section(TopLevel, {k: raw[k] for k in TopLevel.model_fields if k in raw}, "", found)
    for name, model in SECTIONS.items():
        check_section(model, raw.get(name), name, found)
    static = [f"{where}: {problem}" for value, where in _method_names(raw)
              if isinstance(value, str) and (problem := _static_method_problem(value))]
    if not found and not static:
        return False
    problems.extend(found + static)
    if found and not static:
        problems.append(f"method: {', '.join(_module_paths(raw))} not imported yet: "
                        "importing runs the module's code, so that waits until the rest of "
                        "the file is valid")
    return True


def _static_method_problem(value: str) -> str | None:
    """Why ``package.module:Class`` cannot name a method, found without running any of its
    code: the module is located as ``importlib.util.find_spec`` would (but without importing
    its packages), and its source must define ``Class`` at top level as a class with base
    classes (or import it). None: import it and check it is a Method subclass."""
    import ast
    import importlib.machinery
    import sys

    if ":" not in value or value in known_methods():
        return None
    module, _, name = value.partition(":")
    if not module or not name or not all(p.isidentifier() for p in module.split(".")) or \
            not name.isidentifier():
        return (f"got {value!r}; expected package.module:ClassName (a module path and a class "
                "name)")
    if module in sys.modules:
        return None  # already imported: importing it again runs nothing
    spec, path = None, None
    parts = module.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[:i + 1])
        loaded = sys.modules.get(prefix)
        if loaded is not None:
            spec, path = loaded.__spec__, getattr(loaded, "__path__", None)
            continue
        spec = importlib.machinery.PathFinder.find_spec(prefix, path)
        if spec is None:
            return (f"{value!r}: cannot import module {module!r} (no module {prefix!r} on "
                    "PYTHONPATH); is its folder on PYTHONPATH (or the package installed)?")
        path = spec.submodule_search_locations
        if i < len(parts) - 1 and path is None:
            return f"{value!r}: cannot import module {module!r} ({prefix!r} is not a package)"
    origin = getattr(spec, "origin", None)
    if not origin or not str(origin).endswith(".py"):
        return None  # compiled or namespace: nothing to read; the import checks it
    try:
        tree = ast.parse(Path(origin).read_bytes(), filename=str(origin))
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{value!r}: module {module!r} ({origin}) does not parse ({exc})"
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return None if node.bases else (
                f"{value!r}: {module}.{name} is not a method (a subclass of "
                "debias.methods.Method): it has no base class")
        if isinstance(node, ast.ImportFrom | ast.Import) and any(
                (a.asname or a.name.split(".")[-1]) == name for a in node.names):
            return None
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return None
    return f"{value!r}: module {module!r} has no class {name!r} ({origin})"


def _absolute(value: str, cwd: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (cwd / p).resolve()


def _absolute_tracking_uri(uri: str, cwd: Path) -> str:
    """sqlite:///rel.db means relative to the CWD; pin it so Ray workers and later runs agree."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(_absolute(uri[len(prefix):], cwd))
    return uri


def _check_dataset(ds: dict[str, Any], problems: list[str], cwd: Path) -> None:
    name = ds.get("name")
    if name not in DATASETS:
        return
    defaults = Dataset.model_construct()
    for key in METADATA_ONLY if name != "metadata" else ():
        value = ds.pop(key, None)
        if value is not None and value != _dump(getattr(defaults, key)):
            problems.append(f"dataset.{key}: got {show(value)}; only a metadata dataset "
                            f"(dataset.name: metadata) has it, not {name}")
    if name == "synthetic":
        ds.pop("root", None)
    else:
        for key in SYNTHETIC_ONLY:
            ds.pop(key, None)
        if ds.get("root") is None:
            ds.pop("root", None)
            problems.append(f"dataset.root: missing; the {name} dataset needs the folder that "
                            "holds its files (see README, 'Datasets')")
        else:
            ds["root"] = str(_absolute(ds["root"], cwd))
    if ds.get("image_size") is None:
        ds["image_size"] = DEFAULT_IMAGE_SIZE[name]


def _dump(value: Any) -> Any:
    return value.model_dump() if isinstance(value, Section) else value


def _check_targets(cfg: dict[str, Any], raw: Mapping[str, Any], problems: list[str],
                   bad: Any) -> None:
    name = cfg["dataset"].get("name")
    targets = cfg.get("targets") or []
    known: tuple[str, ...] = ()
    if name == "metadata" and cfg["dataset"].get("root"):
        try:  # the attributes are the CSV's columns: its header line says which
            known = dataset_attributes(name, cfg["dataset"])
        except DatasetError as exc:
            problems.append(f"dataset.file: {exc}")
    elif name in DATASETS:
        known = dataset_attributes(name)
    for i, t in enumerate(targets):
        if known and t not in known:
            bad(f"targets[{i}]", t, f"an attribute of {name}{did_you_mean(t, known)}: "
                f"{', '.join(known)}")
    bias = raw.get("bias_attribute")
    if bias is None:
        problems.append("bias_attribute: missing; it is required (the attribute that defines "
                        "evaluation groups, e.g. Male for CelebA, Place for Waterbirds)")
        return
    if isinstance(bias, dict):
        extra = sorted(set(bias) - set(targets))
        missing = [t for t in targets if t not in bias]
        if extra:
            bad("bias_attribute", bias, f"keys that are targets; {extra} are not in targets")
        if missing:
            bad("bias_attribute", bias, f"a bias for every target; missing {missing}")
        pairs = {t: bias.get(t) for t in targets if t in bias}
    elif isinstance(bias, str):
        pairs = dict.fromkeys(targets, bias)
    else:
        bad("bias_attribute", bias, "an attribute name or a map {target: attribute}")
        return
    for t, b in pairs.items():
        path = f"bias_attribute.{t}" if isinstance(bias, dict) else "bias_attribute"
        if not isinstance(b, str) or (known and b not in known):
            bad(path, b, f"an attribute of {name}{did_you_mean(b, known)}: {', '.join(known)}")
        elif b == t:
            bad(path, b, f"an attribute other than the target {t!r}")
        elif known and t in known and (reason := check_pair(name, t, b, cfg["dataset"])):
            bad(path, b, reason)
    cfg["bias_attribute"] = bias


def _check_storage_folder(cfg: dict[str, Any], problems: list[str], cwd: Path) -> None:
    """``storage`` is not a system folder (symbolic links followed)."""
    value = cfg.get("storage")
    if not isinstance(value, str):
        return
    real = _absolute(value, cwd).resolve()
    inside = [t for t in SYSTEM_TREES if real == Path(t) or Path(t) in real.parents]
    if str(real) in SYSTEM_FOLDERS or inside:
        problems.append(f"storage: got {value!r} ({real}); expected a folder of your own (e.g. "
                        "~/debias_results), not a system folder: the sweep writes Ray's "
                        "results, checkpoints and the stage cache there")


def _check_seeds(cfg: dict[str, Any], problems: list[str], bad: Any) -> None:
    """Reported seeds are fresh runs: never the seed the search's trials trained with."""
    search_seed = cfg["search"]["trial_seed"]
    if search_seed in (cfg.get("seeds") or []):
        bad("seeds", cfg["seeds"], f"seeds other than search.trial_seed ({search_seed}): "
            "the seeds phase re-runs the best config fresh, never the search's own trial; "
            "change one of them")


def _check_weights(cfg: dict[str, Any], problems: list[str], cwd: Path) -> None:
    weights = cfg["backbone"].get("weights")
    if weights in (None, "none", "imagenet"):
        arch = cfg["backbone"].get("arch")
        if weights == "imagenet" and str(arch).startswith("small_cnn"):
            problems.append("backbone.weights: got 'imagenet'; expected 'none' or a path for "
                            f"arch {arch} (torchvision has no ImageNet weights for it)")
        return
    path = _absolute(weights, cwd)
    if not path.is_file():
        problems.append(f"backbone.weights: got {weights!r}; expected 'imagenet', 'none' or an "
                        f"existing state_dict file (looked at {path})")
    else:
        cfg["backbone"]["weights"] = str(path)


def _check_metric(cfg: dict[str, Any], methods: list[type[Method]], bad: Any) -> None:
    metric = cfg["search"]["metric"]
    for cls in methods:
        allowed = SELECTION_METRICS + cls.extra_selection_metrics
        if metric not in allowed:
            bad("search.metric", metric, f"one of {', '.join(allowed)} for method {cls.name}")
            return


def _check_scheduler(value: Any, problems: list[str], bad: Any) -> dict[str, Any] | None:
    if value in (None, "none", {}):
        return None
    if not isinstance(value, dict) or set(value) != {"asha"}:
        bad("scheduler", value, "null or {asha: {grace_period: INT, reduction_factor: NUMBER}}")
        return None
    return {"asha": check_section(Asha, value["asha"], "scheduler.asha", problems).model_dump()}


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


def _check_space(cfg: dict[str, Any], space: Any, methods: list[type[Method]],
                 problems: list[str], bad: Any) -> tuple[SearchDomain, ...]:
    if not isinstance(space, dict):
        bad("search.space", space, "a mapping {dotted.key: {float|int: [lo, hi]} | {choice: [..]}}")
        return ()
    sections: dict[str, type[Section]] = dict(SHARED_SEARCHABLE)
    for cls in methods:
        if cls.section:
            sections[cls.section] = cls.Params
    other = {s: c for s, c in builtin_sections().items() if s not in sections}
    algorithm = cfg["search"].get("algorithm")
    grid = algorithm == "grid"
    domains: list[SearchDomain] = []
    for key, dom in space.items():
        where = f"search.space.{key}"
        sec, _, leaf = str(key).partition(".")
        model = sections.get(sec)
        info = model.model_fields.get(leaf) if model else None
        if info is None or not searchable(info):
            if sec in other and leaf in other[sec].Params.model_fields:
                problems.append(f"{where}: a key of method {other[sec].name}, which this "
                                f"sweep does not run (methods: {', '.join(cfg['methods'])})")
                continue
            allowed = [f"{s}.{k}" for s, m in sections.items() for k, fi in m.model_fields.items()
                       if searchable(fi)]
            problems.append(f"{where}: not a searchable key{did_you_mean(key, allowed)}; "
                            f"allowed: {', '.join(allowed)}")
            continue
        when = dom.pop("when", None) if isinstance(dom, dict) else None
        parsed = _parse_domain(where, dom, model, leaf, grid, bad)
        if parsed:
            conditions = _parse_when(where, when, domains, algorithm, bad)
            domains.append(SearchDomain(path=str(key), when=conditions, **parsed))
    if grid and not domains:
        problems.append("search.algorithm: got 'grid'; expected a search.space with at least "
                        "one {choice: [...]} key")
    return tuple(domains)


def _parse_when(where: str, when: Any, earlier: list[SearchDomain], algorithm: Any,
                bad: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """`when: {other.key: value | [values]}`: a condition on choice keys listed earlier."""
    if when is None:
        return ()
    choices = {d.path: d.values for d in earlier if d.kind == "choice"}
    if algorithm != "optuna":
        bad(f"{where}.when", when, "no condition unless search.algorithm is optuna "
            "(conditional spaces are sampled define-by-run by Optuna)")
        return ()
    if not isinstance(when, dict) or not when:
        bad(f"{where}.when", when, "a mapping {other.searched.key: value or [values]}")
        return ()
    out = []
    for key, value in when.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if key not in choices:
            bad(f"{where}.when.{key}", value, "a condition on a {choice: [...]} key listed "
                f"earlier in search.space ({', '.join(choices) or 'none so far'})")
        elif unknown := [v for v in values if v not in choices[key]]:
            bad(f"{where}.when.{key}", value, f"values among {list(choices[key])}, not {unknown}")
        else:
            out.append((str(key), values))
    return tuple(out)


def _parse_domain(where: str, dom: Any, model: type[Section], leaf: str, grid: bool,
                  bad: Any) -> dict[str, Any] | None:
    form = "{float: [lo, hi]}, {int: [lo, hi]} (optionally log: true) or {choice: [v1, v2, ...]}"
    if not isinstance(dom, dict):
        bad(where, dom, form)
        return None
    kinds = [k for k in ("float", "int", "choice") if k in dom]
    extra = set(dom) - {"float", "int", "choice", "log"}
    if len(kinds) != 1 or extra:
        bad(where, dom, form)
        return None
    kind = kinds[0]
    values = dom[kind]
    info = model.model_fields[leaf]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            bad(where, values, "a non-empty list of values for choice")
            return None
        checked = []
        for i, v in enumerate(values):
            value, expected = check_value(model, leaf, v)
            if expected is not None:
                bad(f"{where}.choice[{i}]", v, expected)
            else:
                checked.append(value)
        return {"kind": "choice", "values": tuple(checked)}
    if grid:
        bad(where, dom, "{choice: [...]} (the grid algorithm enumerates choices only)")
        return None
    numeric = field_kind(info)
    if numeric is None or choice_values(info) is not None or (kind == "float"
                                                               and numeric == "int"):
        bad(where, dom, f"{{choice: [...]}}{' or {int: [lo, hi]}' if numeric else ''} "
            "for this key")
        return None
    if not isinstance(values, list) or len(values) != 2:
        bad(f"{where}.{kind}", values, "a range [lo, hi]")
        return None
    ends = [check_value(model, leaf, v) for v in values]
    if any(expected for _, expected in ends):
        bad(f"{where}.{kind}", values, f"ends that are each {next(e for _, e in ends if e)}")
        return None
    lo, hi = (v for v, _ in ends)
    log = dom.get("log", False)
    if not isinstance(log, bool):
        bad(f"{where}.log", log, "true or false")
        return None
    if not lo < hi:
        bad(f"{where}.{kind}", values, "a non-empty range with lo < hi")
        return None
    if log and lo <= 0:
        bad(f"{where}.{kind}", values, "a range with lo > 0 for log: true")
        return None
    return {"kind": kind, "low": lo, "high": hi, "log": log}
