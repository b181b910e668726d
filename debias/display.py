"""How numbers reach a person: durations, metrics with their unit, configs at 3 significant
digits.

Searched values come out of Optuna with every digit of a float (``train.lr=0.048071425018349025``);
what a person compares is the first three. Every printed config (the live view, the report's
best-config column, the plan) goes through :func:`format_config`; MLflow keeps the full values.
Kept free of heavy imports: the report and the progress view both use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["format_config", "format_duration", "format_metric", "format_value", "metric_unit"]

SIGNIFICANT = 3


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` for an unknown (NaN or infinite) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_value(value: Any, digits: int = SIGNIFICANT) -> str:
    """A config value as a person reads it: floats (and strings holding one, as MLflow returns
    params) to ``digits`` significant digits; integers, booleans and words unchanged."""
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():  # an integer as a string: exact
            return text
        try:
            number = float(text)
        except ValueError:
            return value
        if not math.isfinite(number) and text.lower() not in ("nan", "inf", "-inf",
                                                               "+inf", "infinity"):
            return value
    else:
        return str(value)
    if not math.isfinite(number):
        return str(number)
    return f"{number:.{digits}g}"


def format_config(params: Mapping[str, Any], digits: int = SIGNIFICANT) -> str:
    """``key=value, ...`` in key order, each value through :func:`format_value`."""
    return ", ".join(f"{k}={format_value(v, digits)}" for k, v in sorted(params.items()))


def metric_unit(metric: str) -> str:
    """``%`` for accuracies (stored as fractions, read as percent, as in the report), else
    nothing."""
    return "%" if "acc" in metric.rsplit("/", 1)[-1] else ""


def format_metric(metric: str, value: float) -> str:
    """A metric's value with its unit: ``61.2%`` for an accuracy, 3 significant digits
    otherwise."""
    if not math.isfinite(value):
        return "n/a"
    if metric_unit(metric) == "%":
        return f"{100 * value:.1f}%"
    return f"{value:.{SIGNIFICANT}g}"
