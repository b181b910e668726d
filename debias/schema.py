"""The sweep file's JSON Schema, generated from the typed models that validate it.

``python launch.py --schema`` prints it; ``sweeps/sweep.schema.json`` is that output,
committed (a test fails when it is stale), and every shipped sweep file starts with
``# yaml-language-server: $schema=./sweep.schema.json`` so editors complete and check it.
The schema is generated, never written by hand, so it cannot disagree with the validator:
every section (and every built-in method's, plus methods installed packages register) comes
from its model in :mod:`debias.spec` or the method's module. The validator stays the judge
of rules across keys (targets of the dataset, a bias other than the target, ...).
"""

from __future__ import annotations

import json
from typing import Any

from debias.methods import known_methods
from debias.params import Section, searchable
from debias.sections import SECTIONS, SELECTION_METRICS, SHARED_SEARCHABLE, Asha, TopLevel
from debias.spec import builtin_sections

__all__ = ["SCHEMA_ID", "schema_json", "sweep_schema"]

SCHEMA_ID = "https://debias-sweep.invalid/sweep.schema.json"


def _section(model: type[Section], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    defs.update(schema.pop("$defs", {}))
    schema.pop("title", None)
    return schema


def _searchable_keys() -> list[str]:
    sections: dict[str, type[Section]] = dict(SHARED_SEARCHABLE)
    sections.update({name: cls.Params for name, cls in builtin_sections().items()})
    return [f"{s}.{k}" for s, model in sections.items()
            for k, info in model.model_fields.items() if searchable(info)]


def _domain() -> dict[str, Any]:
    pair = {"type": "array", "minItems": 2, "maxItems": 2}
    return {
        "type": "object",
        "description": "{float: [lo, hi]} or {int: [lo, hi]} (optionally log: true), or "
                       "{choice: [v1, v2, ...]}; `when: {other.key: value}` samples the key "
                       "only where a choice listed earlier took that value (Optuna only)",
        "properties": {
            "float": {**pair, "items": {"type": "number"}},
            "int": {**pair, "items": {"type": "integer"}},
            "choice": {"type": "array", "minItems": 1},
            "log": {"type": "boolean"},
            "when": {"type": "object"},
        },
        "additionalProperties": False,
        "oneOf": [{"required": ["float"]}, {"required": ["int"]}, {"required": ["choice"]}],
    }


def sweep_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a sweep file."""
    defs: dict[str, Any] = {}
    methods = known_methods()
    method_value = {"anyOf": [
        {"enum": methods},
        {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
         "description": "package.module:ClassName, a method defined outside the package"}]}
    top = _section(TopLevel, defs)["properties"]
    props: dict[str, Any] = {
        "name": {**top["name"], "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"},
        "method": {**method_value, "default": "erm",
                   "description": "the method (or `methods: [...]` for a study)"},
        "methods": {"type": "array", "items": method_value, "minItems": 1, "uniqueItems": True,
                    "description": "a study: every method gets the same search budget"},
        "targets": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                   "minItems": 1, "uniqueItems": True}],
                    "description": "one search per target attribute"},
        "bias_attribute": {"anyOf": [{"type": "string"}, {
                               "type": "object", "additionalProperties": {"type": "string"}}],
                           "description": "defines the evaluation groups (or a map per target)"},
        "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
                  "uniqueItems": True, "default": [0],
                  "description": "the best config per target is re-run fresh with each seed"},
        "storage": top["storage"],
        "max_failures": top["max_failures"],
    }
    for name, model in SECTIONS.items():
        props[name] = _section(model, defs)
    props["search"]["properties"]["space"] = {
        "anyOf": [{"type": "null"}, {
            "type": "object", "propertyNames": {"enum": _searchable_keys()},
            "additionalProperties": _domain()}]}
    props["search"]["properties"]["metric"]["examples"] = [
        *SELECTION_METRICS, "val/worst_pseudo_group_acc"]
    props["scheduler"] = {"anyOf": [
        {"type": "null"}, {"const": "none"},
        {"type": "object", "properties": {"asha": _section(Asha, defs)},
         "required": ["asha"], "additionalProperties": False}]}
    for section, cls in sorted(builtin_sections().items()):
        props[section] = {**_section(cls.Params, defs),
                          "description": f"method {cls.name}: {cls.summary}"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "debias-sweep sweep file",
        "type": "object",
        "properties": props,
        "required": ["name", "dataset", "targets", "bias_attribute"],
        "additionalProperties": False,
        "not": {"required": ["method", "methods"]},
        **({"$defs": defs} if defs else {}),
    }


def schema_json() -> str:
    return json.dumps(sweep_schema(), indent=2, sort_keys=False) + "\n"
