"""The sweep-file schema, and the only place that validates it.

Everything downstream (the planner, the trainable, the tracker) receives a validated
:class:`Spec` and never re-checks user input. Validation collects *every* problem in the file
and raises one :class:`SpecError` whose lines each name the key path, the bad value and what
is allowed, so a user fixes a file in one round trip and nothing starts on an invalid file.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from debias.data import DATASETS, check_pair, dataset_attributes

__all__ = [
    "METHOD_PARAMS",
    "SearchDomain",
    "Spec",
    "SpecError",
    "config_hash",
    "load_spec",
    "parse_overrides",
    "validate",
    "with_params",
]


class SpecError(ValueError):
    """A sweep file (or --set override) that cannot run; the message lists every problem."""

    def __init__(self, problems: list[str], source: str = "sweep file") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")


class Invalid(Exception):
    """Raised by a field checker; the text says what *is* allowed."""


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- field checkers


@dataclass(frozen=True)
class Field:
    """One leaf of the schema: how to check it, its default, and whether search may vary it."""

    check: Callable[[Any], Any]
    default: Any = None
    required: bool = False
    searchable: bool = True
    numeric: str | None = None  # "int" | "float" for leaves a range domain may address


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        bounds = _bounds(lo, hi)
        if isinstance(v, bool) or not isinstance(v, int):
            raise Invalid(f"an integer{bounds}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise Invalid(f"an integer{bounds}")
        return v

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        what = f"a number{_bounds(lo, hi, lo_open, hi_open)}"
        if isinstance(v, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                raise Invalid(what) from None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise Invalid(what)
        v = float(v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise Invalid(what)
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise Invalid(what)
        return v

    return check


def _bounds(lo: float | None, hi: float | None, lo_open: bool = False,
            hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _choice(*values: Any) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if v not in values or isinstance(v, bool) != isinstance(values[0], bool):
            close = difflib.get_close_matches(str(v), [str(x) for x in values], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise Invalid(f"one of {', '.join(map(str, values))}{hint}")
        return v

    return check


def _float_list(lo: float, lo_open: bool = False) -> Callable[[Any], list[float]]:
    item = _float(lo, None, lo_open=lo_open)

    def check(v: Any) -> list[float]:
        what = f"a non-empty list of distinct numbers{_bounds(lo, None, lo_open)}"
        if not isinstance(v, list) or not v:
            raise Invalid(what)
        try:
            out = [item(x) for x in v]
        except Invalid:
            raise Invalid(what) from None
        if len(set(out)) != len(out):
            raise Invalid(what)
        return out

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid("true or false")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
        raise Invalid("a name of letters, digits, '_', '.', '-' (it names the MLflow experiment)")
    return v


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise Invalid("a non-empty string")
    return v


def _weights(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise Invalid("'imagenet', 'none' or a path to a state_dict file")
    return v


def _seeds(v: Any) -> list[int]:
    if not isinstance(v, list) or not v:
        raise Invalid("a non-empty list of integers, e.g. [0, 1, 2]")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in v):
        raise Invalid("a non-empty list of integers >= 0")
    if len(set(v)) != len(v):
        raise Invalid("a list of distinct seeds")
    return list(v)


def _targets(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(t, str) and t for t in v):
        raise Invalid("a non-empty list of attribute names")
    if len(set(v)) != len(v):
        raise Invalid("a list of distinct attribute names")
    return list(v)


# --------------------------------------------------------------------------- the schema

TRAIN = {
    "epochs": Field(_int(1, 10_000), 10, numeric="int"),
    "batch_size": Field(_int(1, 65_536), 64, numeric="int"),
    "eval_batch_size": Field(_int(1, 65_536), 256, searchable=False),
    "optimizer": Field(_choice("sgd", "adam", "adamw"), "sgd"),
    "lr": Field(_float(0, 10, lo_open=True), 1e-2, numeric="float"),
    "weight_decay": Field(_float(0, 10), 1e-4, numeric="float"),
    "momentum": Field(_float(0, 1, hi_open=True), 0.9, numeric="float"),
    "scheduler": Field(_choice("none", "cosine"), "none"),
    "num_workers": Field(_int(0, 64), 0, searchable=False),
    # GPU path: bf16 autocast (CUDA only; ignored on CPU), channels_last tensors, torch.compile.
    "amp": Field(_bool, False, searchable=False),
    "channels_last": Field(_bool, False, searchable=False),
    "compile": Field(_bool, False, searchable=False),
}

BACKBONE = {
    "arch": Field(_choice("small_cnn", "resnet18", "resnet34", "resnet50"), "small_cnn"),
    "weights": Field(_weights, "none", searchable=False),  # paths are checked up front
}

#: Per-method hyperparameters with their defaults (the original papers' values where they
#: exist). Methods read their section from the resolved trial config; they never re-validate.
METHOD_PARAMS: dict[str, dict[str, Field]] = {
    "erm": {},
    "clusterfix": {
        "k": Field(_int(1, 1024), 8, numeric="int"),
        "beta": Field(_float(0, 100), 0.5, numeric="float"),
        "momentum": Field(_float(0, 1), 0.3, numeric="float"),
        "cluster_loss": Field(_choice("pseudo", "both"), "pseudo"),
        "ema": Field(_choice("sample", "cluster"), "sample"),
        "features": Field(_choice("auto", "backbone", "reference"), "auto"),
        "kmeans_seed": Field(_int(0), 0, searchable=False),
    },
    "slim": {
        "retrain": Field(_choice("full", "last_layer"), "full"),
        "budget_per_class": Field(_int(1, 100_000), 15, numeric="int"),
        "neighbours": Field(_int(1, 1000), 5, numeric="int"),
        "gamma": Field(_float(0, 1e6, lo_open=True), 10.0, numeric="float"),
        "keep_quantile": Field(_float(0, 1, hi_open=True), 0.5, numeric="float"),
        "curated_size": Field(_int(2, 10_000_000), 120, numeric="int"),
        "k_max": Field(_int(2, 50), 5, numeric="int"),
        "cell_share": Field(_choice("spread", "uniform"), "spread"),
        "embedding": Field(_choice("pca", "umap"), "pca"),
        "annotator": Field(_choice("simulated", "csv"), "simulated", searchable=False),
        "annotations": Field(_text, searchable=False),
        "aiou_threshold": Field(_float(0, 1), 0.3, numeric="float"),
        "seed": Field(_int(0), 0, searchable=False),
        # last_layer mode: L1 logistic regressions per grid point, averaged over retrains;
        # DFR's grid of C and of class-weight ratios.
        "retrains": Field(_int(1, 1000), 5, numeric="int"),
        "c_grid": Field(_float_list(0, lo_open=True), [1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01],
                        searchable=False),
        "class_weight_ratios": Field(_float_list(0, lo_open=True), [1.0, 2.0, 3.0, 10.0],
                                     searchable=False),
    },
}

#: The ERM reference model that ClusterFix (where no pretrained backbone exists) and SLIM
#: start from. Fixed per sweep, never searched, so every trial shares one cached model.
REFERENCE = {
    "epochs": Field(_int(1, 10_000), 10, searchable=False),
    "batch_size": Field(_int(1, 65_536), 64, searchable=False),
    "optimizer": Field(_choice("sgd", "adam", "adamw"), "sgd", searchable=False),
    "lr": Field(_float(0, 10, lo_open=True), 0.05, searchable=False),
    "weight_decay": Field(_float(0, 10), 5e-4, searchable=False),
    "momentum": Field(_float(0, 1, hi_open=True), 0.9, searchable=False),
    "scheduler": Field(_choice("none", "cosine"), "none", searchable=False),
    "seed": Field(_int(0), 0, searchable=False),
}

#: Selection metrics every method reports on validation.
SELECTION_METRICS = (
    "val/worst_group_acc",
    "val/avg_acc",
    "val/unbiased_acc",
    "val/weighted_acc",
)
#: Selection metrics only some methods report (they need no bias labels).
METHOD_SELECTION_METRICS = {"clusterfix": ("val/worst_pseudo_group_acc",)}

DATASET_KEYS = {
    "name": Field(_choice(*DATASETS), required=True, searchable=False),
    "root": Field(_text, searchable=False),
    "image_size": Field(_int(8, 1024), searchable=False),
    "spurious_correlation": Field(_float(0.5, 1.0), 0.95, searchable=False),
    "seed": Field(_int(0), 0, searchable=False),
}
SYNTHETIC_ONLY = ("spurious_correlation", "seed")
DEFAULT_IMAGE_SIZE = {"synthetic": 32, "waterbirds": 224, "celeba": 224}

SEARCH = {
    "algorithm": Field(_choice("optuna", "random", "grid"), "optuna"),
    "metric": Field(_text, "val/worst_group_acc"),
    "mode": Field(_choice("max", "min"), "max"),
    "num_samples": Field(_int(1, 100_000), 1),
    "max_concurrent": Field(_int(1, 100_000)),
    "seed": Field(_int(0), 0),
}

ASHA = {
    "grace_period": Field(_int(1), 1),
    "reduction_factor": Field(_float(1, lo_open=True), 3.0),
}

RESOURCES = {
    "cpu": Field(_float(0, lo_open=True), 1.0),
    "gpu": Field(_float(0), 0.0),
}

#: Fault injection, to check on a real cluster that a crashed trial resumes from its checkpoint.
DEBUG = {
    "fail_once_at_epoch": Field(_int(1), searchable=False),
    # Trials with this seed crash after epoch `fail_once_at_epoch` (default 1) on every
    # attempt: a persistent bug, to check that it is recorded and the others carry on.
    "fail_seed": Field(_int(0), searchable=False),
}

TOP_LEVEL = (
    "name", "method", "dataset", "targets", "bias_attribute", "seeds", "backbone", "train",
    *METHOD_PARAMS, "reference", "search", "scheduler", "resources", "tracking", "storage",
    "max_failures", "debug",
)

SEARCHABLE_SECTIONS = ("train", "backbone", *METHOD_PARAMS)


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class SearchDomain:
    """One searched key: the dotted path and its distribution, independent of Ray or Optuna."""

    path: str
    kind: str  # "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple[Any, ...] = ()
    #: Sampled only when every named key took one of the listed values (Optuna only), e.g.
    #: SGD's momentum only when optimizer is "sgd"; otherwise the file's own value is used.
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, chosen: Mapping[str, Any]) -> bool:
        return all(key in chosen and chosen[key] in values for key, values in self.when)


@dataclass(frozen=True)
class Spec:
    """A validated sweep: the resolved config (defaults filled, paths absolute)."""

    config: dict[str, Any]
    space: tuple[SearchDomain, ...] = field(default_factory=tuple)
    source: str = "<memory>"

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def targets(self) -> list[str]:
        return self.config["targets"]

    @property
    def seeds(self) -> list[int]:
        return self.config["seeds"]

    @property
    def search(self) -> dict[str, Any]:
        return self.config["search"]

    @property
    def storage(self) -> Path:
        return Path(self.config["storage"])

    @property
    def tracking_uri(self) -> str:
        return self.config["tracking"]["uri"]

    def bias_for(self, target: str) -> str:
        bias = self.config["bias_attribute"]
        return bias[target] if isinstance(bias, dict) else bias

    def values_of(self, path: str) -> set[Any]:
        """See :func:`_choices`."""
        return _choices(self.config, self.space, path)

    def trial_base(self, target: str) -> dict[str, Any]:
        """The trial config before the search's values are applied: all a trainable needs."""
        c = self.config
        return copy.deepcopy({
            "method": c["method"],
            "dataset": c["dataset"],
            "target": target,
            "bias": self.bias_for(target),
            "seed": c["seeds"][0],
            "backbone": c["backbone"],
            "train": c["train"],
            c["method"]: c[c["method"]],
            "reference": c["reference"],
            "selection": {"metric": c["search"]["metric"], "mode": c["search"]["mode"]},
            "cache_dir": str(Path(c["storage"]) / "cache"),
            "debug": c["debug"],
        })


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
    """Parse `KEY=VALUE` strings; values are YAML so `targets=[A, B]` and `train.lr=1e-3` work."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w./-]+)*", key.strip()):
            raise SpecError([f"--set {item!r}: expected KEY=VALUE with a dotted key, "
                             "e.g. --set train.epochs=2"], source="command line")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise SpecError([f"--set {key}: value {raw!r} is not valid YAML ({exc})"],
                            source="command line") from None
        out.append((key.strip(), value))
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
    """Read, override, validate. Relative paths in the file resolve against the CWD."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such sweep file"], source=str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"YAML syntax error{where}: {problem}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise SpecError([f"the file must be a mapping of keys (name, method, dataset, ...), "
                         f"got {type(raw).__name__}"], source=str(path))
    for key, value in parse_overrides(overrides):
        _set_path(raw, key, value)
    return validate(raw, source=str(path), cwd=cwd)


# --------------------------------------------------------------------------- validation


def validate(raw: Mapping[str, Any], source: str = "sweep file", cwd: Path | None = None) -> Spec:
    """Check every key; return a resolved Spec or raise one SpecError listing all problems."""
    cwd = cwd or Path.cwd()
    problems: list[str] = []
    raw = _expand_env(copy.deepcopy(dict(raw)))

    def bad(path: str, value: Any, expected: str) -> None:
        problems.append(f"{path}: got {_show(value)}; expected {expected}")

    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: unknown key{hint}; allowed: {', '.join(TOP_LEVEL)}")

    def section(name: str, fields: Mapping[str, Field], value: Any) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            bad(name, value, f"a mapping with keys {', '.join(fields) or '(none)'}")
            value = {}
        out = {}
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                allowed = ", ".join(fields) or "no keys"
                problems.append(f"{name}.{key}: unknown key{hint}; allowed: {allowed}")
        for key, f in fields.items():
            if key in value and value[key] is not None:
                try:
                    out[key] = f.check(value[key])
                except Invalid as exc:
                    bad(f"{name}.{key}", value[key], str(exc))
            elif f.required:
                problems.append(f"{name}.{key}: missing; it is required")
            elif f.default is not None:
                out[key] = copy.deepcopy(f.default)
        return out

    cfg: dict[str, Any] = {}
    scalar = {
        "name": Field(_name, required=True),
        "method": Field(_choice(*METHOD_PARAMS), "erm"),
        "targets": Field(_targets, required=True),
        "seeds": Field(_seeds, [0]),
        "storage": Field(_text, "debias_results"),
        "max_failures": Field(_int(0, 100), 2),
    }
    cfg.update(section("<top>", scalar, {k: raw.get(k) for k in scalar}))
    problems[:] = [p.replace("<top>.", "") for p in problems]

    cfg["dataset"] = section("dataset", DATASET_KEYS, raw.get("dataset"))
    if "dataset" not in raw:
        problems.append("dataset: missing; it is required (e.g. dataset: {name: synthetic})")
    _check_dataset(cfg["dataset"], problems, cwd)

    cfg["backbone"] = section("backbone", BACKBONE, raw.get("backbone"))
    cfg["train"] = section("train", TRAIN, raw.get("train"))
    for method, fields in METHOD_PARAMS.items():
        cfg[method] = section(method, fields, raw.get(method))
    cfg["reference"] = section("reference", REFERENCE, raw.get("reference"))
    cfg["search"] = section("search", {**SEARCH, "space": Field(lambda v: v)}, raw.get("search"))
    cfg["resources"] = section("resources", RESOURCES, raw.get("resources"))
    cfg["tracking"] = section("tracking", {"uri": Field(_text, "sqlite:///mlflow.db")},
                              raw.get("tracking"))
    cfg["debug"] = section("debug", DEBUG, raw.get("debug"))
    cfg["scheduler"] = _check_scheduler(raw.get("scheduler"), section, bad)

    _check_targets(cfg, raw, problems, bad)
    _check_weights(cfg, problems, cwd)
    _check_method(cfg, problems, cwd)
    _check_metric(cfg, bad)
    space = _check_space(cfg, cfg["search"].pop("space", None) or {}, problems, bad)
    _check_slim_space(cfg, space, problems)

    if problems:
        raise SpecError(list(dict.fromkeys(problems)), source=source)
    cfg["storage"] = str(_absolute(cfg["storage"], cwd))
    cfg["tracking"]["uri"] = _absolute_tracking_uri(cfg["tracking"]["uri"], cwd)
    return Spec(config=cfg, space=space, source=source)


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
    if name == "synthetic":
        ds.pop("root", None)
    else:
        for key in SYNTHETIC_ONLY:
            ds.pop(key, None)
        if "root" not in ds:
            problems.append(f"dataset.root: missing; the {name} dataset needs the folder that "
                            "holds its files (see README, 'Datasets')")
        else:
            ds["root"] = str(_absolute(ds["root"], cwd))
    ds.setdefault("image_size", DEFAULT_IMAGE_SIZE[name])


def _check_targets(cfg: dict[str, Any], raw: Mapping[str, Any], problems: list[str],
                   bad: Callable[[str, Any, str], None]) -> None:
    name = cfg["dataset"].get("name")
    targets = cfg.get("targets") or []
    known = dataset_attributes(name) if name in DATASETS else ()
    for i, t in enumerate(targets):
        if known and t not in known:
            close = difflib.get_close_matches(t, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            bad(f"targets[{i}]", t, f"an attribute of {name}{hint}: {', '.join(known)}")
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
            close = difflib.get_close_matches(str(b), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            bad(path, b, f"an attribute of {name}{hint}: {', '.join(known)}")
        elif b == t:
            bad(path, b, f"an attribute other than the target {t!r}")
        elif known and t in known and (reason := check_pair(name, t, b)):
            bad(path, b, reason)
    cfg["bias_attribute"] = bias


def _check_weights(cfg: dict[str, Any], problems: list[str], cwd: Path) -> None:
    weights = cfg["backbone"].get("weights")
    if weights in (None, "none", "imagenet"):
        if weights == "imagenet" and cfg["backbone"].get("arch") == "small_cnn":
            problems.append("backbone.weights: got 'imagenet'; expected 'none' or a path for "
                            "arch small_cnn (torchvision has no ImageNet weights for it)")
        return
    path = _absolute(weights, cwd)
    if not path.is_file():
        problems.append(f"backbone.weights: got {weights!r}; expected 'imagenet', 'none' or an "
                        f"existing state_dict file (looked at {path})")
    else:
        cfg["backbone"]["weights"] = str(path)


def _check_method(cfg: dict[str, Any], problems: list[str], cwd: Path) -> None:
    """Cross-key rules of the method sections (single keys are checked by their Field)."""
    method = cfg.get("method")
    if method == "clusterfix" and cfg["clusterfix"].get("features") == "backbone" and \
            cfg["backbone"].get("weights") == "none":
        problems.append("clusterfix.features: got 'backbone'; expected 'reference' or 'auto' "
                        "when backbone.weights is 'none' (random features cannot cluster)")
    if method == "slim":
        slim = cfg["slim"]
        import importlib.util

        if slim.get("embedding") == "umap" and importlib.util.find_spec("umap") is None:
            problems.append("slim.embedding: got 'umap'; expected 'pca' here, or install "
                            "umap-learn first (pip install -e '.[umap]')")
        if slim.get("annotator") == "csv":
            if "annotations" not in slim:
                problems.append("slim.annotations: missing; expected the path of the annotation "
                                "CSV when slim.annotator is 'csv' (it is written for you to fill "
                                "in if it does not exist)")
            else:
                slim["annotations"] = str(_absolute(slim["annotations"], cwd))


def _choices(cfg: dict[str, Any], space: tuple[SearchDomain, ...], path: str) -> set[Any]:
    """Every value a choice key can take in this sweep: its searched values, else the file's."""
    for d in space:
        if d.path == path:
            return set(d.values)
    section, _, leaf = path.partition(".")
    return {cfg[section].get(leaf)}


#: Knobs that change *which images* SLIM shows the annotator (the architecture through the
#: reference model's GradCAM). ``slim.retrain`` also does, but the request covers every mode
#: the sweep can take: its rows carry their split.
_SAMPLING_KEYS = ("slim.budget_per_class", "slim.neighbours", "slim.embedding", "backbone.arch")


def _check_slim_space(cfg: dict[str, Any], space: tuple[SearchDomain, ...],
                      problems: list[str]) -> None:
    """Rules between SLIM's knobs and the search: they need the parsed space."""
    if cfg.get("method") != "slim":
        return
    if cfg["scheduler"] and "last_layer" in _choices(cfg, space, "slim.retrain"):
        problems.append("scheduler: got ASHA; expected null when slim.retrain can be "
                        "'last_layer' (its steps are points of the C x class-weight grid, not "
                        "epochs, so stopping early would skip grid points, not epochs)")
    if _choices(cfg, space, "slim.retrain") == {"last_layer"}:
        idle = [d.path for d in space if d.path.startswith("train.")]
        if idle:
            problems.append(f"search.space: {', '.join(idle)} searched with slim.retrain "
                            "'last_layer'; expected no train.* keys (last-layer retraining is a "
                            "grid of logistic regressions: SGD's knobs would not change a thing)")
    if cfg["slim"].get("annotator") == "csv":
        searched = [d.path for d in space if d.path in _SAMPLING_KEYS]
        if searched:
            problems.append(f"search.space: {', '.join(searched)} searched with slim.annotator "
                            "'csv'; expected these fixed (each value samples other images, and "
                            "one annotation file answers one sampling)")


def _check_metric(cfg: dict[str, Any], bad: Callable[[str, Any, str], None]) -> None:
    metric = cfg["search"].get("metric")
    allowed = SELECTION_METRICS + METHOD_SELECTION_METRICS.get(cfg.get("method"), ())
    if metric is not None and metric not in allowed:
        bad("search.metric", metric, f"one of {', '.join(allowed)} for method "
            f"{cfg.get('method')}")


def _check_scheduler(value: Any, section: Callable[..., dict[str, Any]],
                     bad: Callable[[str, Any, str], None]) -> dict[str, Any] | None:
    if value in (None, "none", {}):
        return None
    if not isinstance(value, dict) or set(value) != {"asha"}:
        bad("scheduler", value, "null or {asha: {grace_period: INT, reduction_factor: NUMBER}}")
        return None
    return {"asha": section("scheduler.asha", ASHA, value["asha"])}


def _check_space(cfg: dict[str, Any], space: Any, problems: list[str],
                 bad: Callable[[str, Any, str], None]) -> tuple[SearchDomain, ...]:
    if not isinstance(space, dict):
        bad("search.space", space, "a mapping {dotted.key: {float|int: [lo, hi]} | {choice: [..]}}")
        return ()
    sections = {"train": TRAIN, "backbone": BACKBONE, cfg.get("method"): METHOD_PARAMS.get(
        cfg.get("method"), {})}
    grid = cfg["search"].get("algorithm") == "grid"
    domains = []
    for key, dom in space.items():
        where = f"search.space.{key}"
        sec, _, leaf = str(key).partition(".")
        fields = sections.get(sec) if sec in SEARCHABLE_SECTIONS else None
        f = fields.get(leaf) if fields else None
        if f is None or not f.searchable:
            allowed = [f"{s}.{k}" for s, fs in sections.items() if s for k, fx in fs.items()
                       if fx.searchable]
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: not a searchable key{hint}; allowed: {', '.join(allowed)}")
            continue
        when = dom.pop("when", None) if isinstance(dom, dict) else None
        parsed = _parse_domain(where, dom, f, grid, problems, bad)
        if parsed:
            conditions = _parse_when(where, when, domains, cfg["search"].get("algorithm"), bad)
            domains.append(SearchDomain(path=str(key), when=conditions, **parsed))
    if grid and not domains:
        problems.append("search.algorithm: got 'grid'; expected a search.space with at least "
                        "one {choice: [...]} key")
    return tuple(domains)


def _parse_when(where: str, when: Any, earlier: list[SearchDomain], algorithm: Any,
                bad: Callable[[str, Any, str], None]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
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


def _parse_domain(where: str, dom: Any, f: Field, grid: bool, problems: list[str],
                  bad: Callable[[str, Any, str], None]) -> dict[str, Any] | None:
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
    if kind == "choice":
        if not isinstance(values, list) or not values:
            bad(where, values, "a non-empty list of values for choice")
            return None
        checked = []
        for i, v in enumerate(values):
            try:
                checked.append(f.check(v))
            except Invalid as exc:
                bad(f"{where}.choice[{i}]", v, str(exc))
        return {"kind": "choice", "values": tuple(checked)}
    if grid:
        bad(where, dom, "{choice: [...]} (the grid algorithm enumerates choices only)")
        return None
    if f.numeric is None or (kind == "float" and f.numeric == "int"):
        bad(where, dom, f"{{choice: [...]}}{' or {int: [lo, hi]}' if f.numeric else ''} "
            "for this key")
        return None
    if not isinstance(values, list) or len(values) != 2:
        bad(f"{where}.{kind}", values, "a range [lo, hi]")
        return None
    try:
        lo, hi = (f.check(v) for v in values)
    except Invalid as exc:
        bad(f"{where}.{kind}", values, f"ends that are each {exc}")
        return None
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
