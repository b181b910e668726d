"""Typed knobs: how every section of a sweep file (and every method's parameters) is declared.

A section is a pydantic model whose fields are built with :func:`Int`, :func:`Float`,
:func:`Choice`, :func:`Flag`, :func:`Text` or :func:`Floats`. One declaration gives three
things, so they can never disagree:

- validation (pydantic does the checking; NaN and infinity are refused everywhere),
- the JSON Schema that editors use to complete and check sweep files (``launch.py --schema``),
- the sentence a user reads when a value is wrong: :func:`problems_of` turns pydantic's
  errors into one line per key, ``train.lr: got -1.0; expected a number in (0, 10]``, with
  did-you-mean hints for unknown keys and choices, every problem at once.

A field also says whether a search may vary it (``searchable``); ranges (``{float: [lo,
hi]}``) are allowed on numeric fields, ``{choice: [...]}`` on any searchable field.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn, Union, get_args, get_origin

import annotated_types as at
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic import Field as _Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = [
    "Choice",
    "Flag",
    "Float",
    "Floats",
    "Int",
    "Number",
    "SearchDomain",
    "Section",
    "Text",
    "check_value",
    "choice_values",
    "defer",
    "describe",
    "did_you_mean",
    "field_kind",
    "problems_of",
    "refuse",
    "searchable",
    "show",
]


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: accept numeric strings, refuse bools
    (``True`` is an int to Python, never a learning rate to a person)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError("not a number") from None
    return value


#: A float knob: ints, floats and numeric strings; never a bool, NaN or infinity.
Number = Annotated[float, BeforeValidator(_number)]


class Section(BaseModel):
    """A section of the sweep file: unknown keys refused, values frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False,
                              validate_default=False)


# --------------------------------------------------------------------------- field builders


def _extra(searchable: bool, expected: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"x-searchable": searchable}
    if expected:
        out["x-expected"] = expected
    return out


def Int(default: Any = ..., lo: int | None = None, hi: int | None = None, *,
        searchable: bool = True, doc: str = "") -> Any:
    """An integer in [lo, hi] (bools and floats refused)."""
    return _Field(default, ge=lo, le=hi, strict=True, description=doc or None,
                  json_schema_extra=_extra(searchable))


def Float(default: Any = ..., lo: float | None = None, hi: float | None = None, *,
          lo_open: bool = False, hi_open: bool = False, searchable: bool = True,
          doc: str = "") -> Any:
    """A finite number between lo and hi, each end open or closed."""
    return _Field(default, ge=None if lo_open else lo, gt=lo if lo_open else None,
                  le=None if hi_open else hi, lt=hi if hi_open else None,
                  allow_inf_nan=False, description=doc or None,
                  json_schema_extra=_extra(searchable))


def Choice(default: Any = ..., *, searchable: bool = True, doc: str = "") -> Any:
    """One of the field's ``Literal`` values."""
    return _Field(default, description=doc or None, json_schema_extra=_extra(searchable))


def Flag(default: Any = ..., *, searchable: bool = False, doc: str = "") -> Any:
    """true or false."""
    return _Field(default, strict=True, description=doc or None,
                  json_schema_extra=_extra(searchable))


def Text(default: Any = ..., *, expected: str = "a non-empty string", searchable: bool = False,
         doc: str = "") -> Any:
    """A string (validators on the model refine it; ``expected`` is what users are told)."""
    return _Field(default, min_length=1, description=doc or None,
                  json_schema_extra=_extra(searchable, expected))


def Floats(default: Any = ..., *, expected: str, doc: str = "") -> Any:
    """A list of numbers (never searched: the list is itself a grid)."""
    return _Field(default, min_length=1, description=doc or None,
                  json_schema_extra=_extra(False, expected))


# --------------------------------------------------------------------------- introspection


def _base_type(info: FieldInfo) -> Any:
    """The field's type without ``Annotated`` wrappers and without ``| None``."""
    tp = info.annotation
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return tp
            tp = rest[0]
        else:
            return tp


def choice_values(info: FieldInfo) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` field, else None."""
    tp = _base_type(info)
    return get_args(tp) if get_origin(tp) is Literal else None


def field_kind(info: FieldInfo) -> str | None:
    """'int' or 'float' for fields a range domain may address; None otherwise."""
    tp = _base_type(info)
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    return None


def searchable(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return bool(isinstance(extra, dict) and extra.get("x-searchable", False))


def _bounds(info: FieldInfo) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def did_you_mean(value: Any, options: Any) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(info: FieldInfo, value: Any = None) -> str:
    """What a field allows, in words: the 'expected ...' half of an error message."""
    if expected := _extra_of(info, "x-expected"):
        return str(expected)
    values = choice_values(info)
    if values is not None:
        return f"one of {', '.join(map(str, values))}{did_you_mean(value, values)}"
    kind = field_kind(info)
    if kind == "int":
        return f"an integer{_bounds(info)}"
    if kind == "float":
        return f"a finite number{_bounds(info)}" if _non_finite(value) else \
            f"a number{_bounds(info)}"
    if _base_type(info) is bool:
        return "true or false"
    return "a valid value"


def _non_finite(value: Any) -> bool:
    try:
        return isinstance(value, float | int | str) and not isinstance(value, bool) and \
            not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def show(value: Any) -> str:
    """A value as the user wrote it, short enough for one line."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, default=str, allow_nan=True)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- checking


#: The error type of a rule across keys (a validator of a section or of the whole file): its
#: message is already the finished problem lines, each naming its own key path.
RULE = "sweep_rule"


def refuse(*lines: str) -> NoReturn:
    """Fail a validator with finished problem lines (``"train.lr: got ...; expected ..."``)."""
    raise PydanticCustomError(RULE, "{lines}", {"lines": "\n".join(lines)})


def defer(info: ValidationInfo, *lines: str) -> None:
    """Report problems of a value that the rules after it can still use (a dataset without
    its root still names its attributes): validation goes on and reports them with the rest,
    collected in the context's ``deferred`` list. Without one, fail at once."""
    deferred = (info.context or {}).get("deferred")
    if deferred is None:
        refuse(*lines)
    deferred.extend(lines)


def _section_type(info: FieldInfo | None) -> type[Section] | None:
    tp = _base_type(info) if info is not None else None
    for t in (tp, *get_args(tp)):
        if isinstance(t, type) and issubclass(t, Section):
            return t
    return None


def problems_of(exc: ValidationError, model: type[Section], value: Any,
                unknown_top_keys: bool = True) -> list[str]:
    """pydantic's errors as one line per bad key path: ``train.lr: got -1.0; expected a number
    in (0, 10]``, ``train.epoch: unknown key (did you mean 'epochs'?); allowed: ...``, and
    the finished lines of rules across keys. A section whose model says what it expects as a
    whole (``x-expected`` in its config) is refused as a whole when its keys are wrong."""
    out: dict[str, str] = {}
    for err in exc.errors():
        if err["type"] == RULE:
            out.update((line, line) for line in err["ctx"]["lines"].split("\n"))
            continue
        m: type[Section] | None = model
        raw, path, info = value, [], None
        parent_raw, parent = value, model
        for part in err["loc"]:
            if m is not None and isinstance(part, str) and part in m.model_fields:
                parent_raw, parent = raw, m
                info = m.model_fields[part]
                path.append(part)
                raw = raw.get(part) if isinstance(raw, Mapping) else None
                m = _section_type(info)
            elif err["type"] in ("extra_forbidden", "missing") and part == err["loc"][-1]:
                parent_raw, parent, info = raw, m, None
                path.append(str(part))
        where = ".".join(path)
        whole = ((parent.model_config.get("json_schema_extra") or {}).get("x-expected")
                 if err["type"] in ("extra_forbidden", "missing") and parent is not None
                 and parent is not model else None)
        if whole:  # a key of a section that is refused as a whole
            at = ".".join(path[:-1])
            out.setdefault(at, f"{at}: got {show(parent_raw)}; expected {whole}")
        elif err["type"] == "extra_forbidden":
            if len(path) > 1 or unknown_top_keys:
                key, fields = path[-1], list(parent.model_fields) if parent else []
                out.setdefault(where, f"{where}: unknown key{did_you_mean(key, fields)}; "
                                      f"allowed: {', '.join(fields) or 'no keys'}")
        elif err["type"] == "missing":
            hint = _extra_of(parent.model_fields.get(path[-1]) if parent else None, "x-missing")
            out.setdefault(where, f"{where}: missing; it is required{hint or ''}")
        elif info is not None and m is not None and not isinstance(raw, Mapping):
            expected = _extra_of(info, "x-expected") or \
                f"a mapping with keys {', '.join(m.model_fields) or '(none)'}"
            out.setdefault(where, f"{where}: got {show(raw)}; expected {expected}")
        elif info is not None and m is None:
            out.setdefault(where, f"{where}: got {show(raw)}; expected {describe(info, raw)}")
        else:  # a rule of a section's own (a model validator on several of its keys)
            out.setdefault(where, f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return list(out.values())


def _extra_of(info: FieldInfo | None, key: str) -> Any:
    extra = info.json_schema_extra if info is not None else None
    return extra.get(key) if isinstance(extra, dict) else None


def check_value(model: type[Section], key: str, value: Any) -> tuple[Any, str | None]:
    """(the validated value, None) or (None, what is allowed): one field on its own, for
    search-space choices and range ends."""
    info = model.model_fields[key]
    try:
        return _adapter(model, key).validate_python(value), None
    except ValidationError:
        return None, describe(info, value)


@functools.cache
def _adapter(model: type[Section], key: str) -> TypeAdapter[Any]:
    info = model.model_fields[key]
    return TypeAdapter(Annotated[info.annotation, info],
                       config=ConfigDict(allow_inf_nan=False))


# --------------------------------------------------------------------------- search domains


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

    def describe(self) -> str:
        rng = (f"choice {list(self.values)}" if self.kind == "choice"
               else f"{self.kind} [{self.low}, {self.high}]{' log' if self.log else ''}")
        when = "; ".join(f"{k} in {list(v)}" for k, v in self.when)
        return rng + (f" (only when {when})" if when else "")
