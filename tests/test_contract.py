"""The contract every registered method keeps, checked for each one the registry knows (as
DomainBed's test_models.py does for its algorithms): a new method is tested here without
anyone writing a test for it.

- its parameters round-trip through the JSON Schema a sweep file is checked against, and a
  sweep file naming it validates with its defaults;
- a trial of its kind runs on the embedded data (two steps: epochs or grid points) and
  reports the metrics every method reports;
- a trial resumed from its step-1 checkpoint ends with the numbers of an uninterrupted one;
- a method that declares it reads no training bias labels computes bit-identical numbers
  when those labels are permuted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from debias.data import load_grouped
from debias.engine import Trainer
from debias.last_layer import LastLayerTrial
from debias.methods import known_methods, resolve_method
from debias.spec import validate, with_params

DATASET = {"name": "synthetic", "image_size": 16, "spurious_correlation": 0.9, "size": 1000}
#: Budget overrides only (never what a method computes): fewer images, grid points, UMAP's
#: JIT compile avoided. A method without an entry runs on its defaults.
FAST: dict[str, dict[str, Any]] = {
    "slim": {"embedding": "pca", "budget_per_class": 5, "curated_size": 60},
    "dfr": {"c_grid": [1.0, 0.1], "final_retrains": 2},
    "jtt": {"epochs_id": 1},
    "clusterfix": {"k": 2},
}
#: Numbers that describe the training bias labels themselves (reporting only): they may move.
DESCRIBES_TRAIN_BIAS = ("val/weighted_acc", "test/weighted_acc", "clusterfix/cluster_purity/",
                        "clusterfix/mean_purity", "slim/curated_group/", "jtt/error_group/",
                        "groupdro/", "last_layer/final_fit_group/")
METHODS = known_methods()


def _config(root: Path, name: str) -> dict[str, Any]:
    cls = resolve_method(name)
    sections = {cls.section: FAST.get(name, {})} if cls.section else {}
    spec = validate({
        "name": "contract", "method": name, "targets": ["Odd"], "bias_attribute": "Background",
        "dataset": DATASET, "backbone": {"arch": "small_cnn", "weights": "none"},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.05},
        "reference": {"epochs": 1, "batch_size": 128}, **sections, "storage": str(root)})
    return with_params(spec.trial_base("Odd"), {"seed": 0})


def _trial(config: dict[str, Any], data: Any = None) -> Any:
    cls = resolve_method(config["method"])
    kind = cls.trial_kind(cls.params_of(config))
    return (Trainer if kind == "epochs" else LastLayerTrial)(config, cls, "cpu", data=data)


def _steps(trial: Any, n: int) -> list[dict[str, Any]]:
    out = []
    for metrics in trial.epochs():
        out.append(metrics)
        if len(out) == n:
            break
    return out


def _numbers(history: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if isinstance(v, float) and not k.startswith(
        ("cache/", "artifacts/", "perf/", *skip))} for m in history]


@pytest.mark.parametrize("name", METHODS)
def test_parameters_round_trip_through_the_schema(name: str) -> None:
    import jsonschema

    cls = resolve_method(name)
    defaults = cls.Params().model_dump()
    schema = cls.Params.model_json_schema()
    jsonschema.validate(defaults, schema)
    assert cls.Params.model_validate(defaults).model_dump() == defaults
    assert set(defaults) <= set(schema.get("properties", {}))
    spec = validate({"name": "x", "method": name, "targets": ["Odd"],
                     "bias_attribute": "Background", "dataset": {"name": "synthetic"}})
    if cls.section:
        assert spec.config[cls.section] == defaults


@pytest.fixture(scope="module")
def data() -> Any:
    return load_grouped(DATASET, "Odd", "Background")


@pytest.mark.parametrize("name", METHODS)
def test_a_trial_runs_resumes_and_keeps_to_its_bias_labels(
        name: str, data: Any, tmp_path: Path) -> None:
    config = _config(tmp_path / "a", name)
    uninterrupted = _steps(_trial(config, data), 2)
    assert [m["epoch"] for m in uninterrupted] == [1, 2]
    for key in ("train/loss", "val/avg_acc", "val/worst_group_acc", "selected/score"):
        assert key in uninterrupted[-1], key
    assert any(k.startswith("test/") for k in uninterrupted[-1])

    first = _trial(config, data)
    _steps(first, 1)
    first.save(tmp_path / "state.pt")
    resumed = _trial(config, data)
    resumed.load(tmp_path / "state.pt")
    assert _numbers(_steps(resumed, 1)) == _numbers(uninterrupted[1:])

    cls = resolve_method(name)
    if cls.bias_labels(cls.params_of(config)).train:
        return  # an oracle: it reads them (tests/test_baselines.py checks it learns from them)
    a = np.array(data.a)
    rows = np.flatnonzero(np.asarray(data.split) == 0)
    a[rows] = np.random.default_rng(0).permutation(a[rows])
    permuted = dataclasses.replace(data, a=a)
    trial = _trial(_config(tmp_path / "b", name), permuted)
    other = _steps(trial, 2)
    assert _numbers(other, DESCRIBES_TRAIN_BIAS) == _numbers(uninterrupted, DESCRIBES_TRAIN_BIAS)
    weights = (trial.model.state_dict() if isinstance(trial, Trainer)
               else {"head": torch.from_numpy(trial.selected_head.weight)})
    assert weights  # and the state it learnt is what an unpermuted run learns
    again = _trial(_config(tmp_path / "c", name), data)
    _steps(again, 2)
    reference = (again.model.state_dict() if isinstance(again, Trainer)
                 else {"head": torch.from_numpy(again.selected_head.weight)})
    for key in weights:
        assert torch.equal(torch.as_tensor(weights[key]), torch.as_tensor(reference[key])), key
