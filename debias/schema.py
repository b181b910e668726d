"""The sweep file's JSON Schema: the model that validates it, as JSON Schema.

``python launch.py --schema`` prints it; ``sweeps/sweep.schema.json`` is that output,
committed (a test fails when it is stale), and every shipped sweep file starts with
``# yaml-language-server: $schema=./sweep.schema.json`` so editors complete and check it.
It is :func:`debias.spec.sweep_model`'s ``model_json_schema()`` (every built-in method's
section, plus those installed packages register), so it cannot disagree with the validator;
the validator stays the judge of rules across keys (targets of the dataset, a bias other
than the target, ...).
"""

from __future__ import annotations

import json
from typing import Any

from debias.spec import sweep_model

__all__ = ["SCHEMA_ID", "schema_json", "sweep_schema"]

SCHEMA_ID = "https://debias-sweep.invalid/sweep.schema.json"


def sweep_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a sweep file."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            **sweep_model().model_json_schema()}


def schema_json() -> str:
    return json.dumps(sweep_schema(), indent=2, sort_keys=False) + "\n"
