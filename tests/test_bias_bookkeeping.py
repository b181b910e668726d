"""Which bias labels a method reads is said as it is (stand-ins included), and a method is
paired with the right ERM row."""

from __future__ import annotations

from typing import Any

import pytest

from debias.methods import resolve_method
from debias.report import AmbiguousReference, Row, pair
from debias.spec import validate
from debias.sweep import _parent_tags, describe_plan, pipelines


def _spec(dataset: dict[str, Any], **slim: Any) -> Any:
    return validate({"name": "b", "method": "slim", "targets": ["Odd"] if dataset["name"] ==
                     "synthetic" else ["Blond_Hair"],
                     "bias_attribute": "Background" if dataset["name"] == "synthetic"
                     else "Male", "dataset": dataset, "slim": slim})


def test_a_simulated_annotator_counts_as_reading_bias_labels() -> None:
    slim = resolve_method("slim")
    params = slim.Params(annotator="simulated")
    assert slim.bias_labels(params, "synthetic").describe() == \
        "simulated annotator (object masks)"
    assert slim.bias_labels(params, "celeba").describe() == "simulated annotator (groups)"
    assert slim.bias_labels(params, "celeba").reads_any
    assert slim.bias_labels(slim.Params(annotator="random"), "celeba").describe() == "none"
    assert not slim.bias_labels(params, "celeba").train  # never handed to the method itself
    spec = _spec({"name": "synthetic"})
    assert "bias labels for training: simulated annotator (object masks)" in describe_plan(spec)
    tags = _parent_tags(spec, pipelines(spec)[0])
    assert tags["bias_labels"] == "simulated annotator (object masks)"
    assert tags["dataset_config"] and "epochs" in tags["trial_selects_among"]


def _row(sweep: str, method: str, wga: dict[int, float], config: str = "d1",
         target: str = "Odd") -> Row:
    return Row(target=target, bias="Background", method=method, status="FINISHED",
               sweep=sweep, wga_by_seed=wga, dataset_config=config)


def test_compare_pairs_with_the_same_sweeps_erm_then_the_same_dataset_configuration() -> None:
    own = pair([_row("a", "erm", {0: 0.5, 1: 0.6}), _row("a", "dfr", {0: 0.7, 1: 0.9}),
                _row("b", "erm", {0: 0.0, 1: 0.0})])
    dfr = next(r for r in own if r.method == "dfr")
    assert dfr.delta_wga.mean == pytest.approx(0.25) and dfr.paired_with == ""
    across = pair([_row("a", "erm", {0: 0.5, 1: 0.6}), _row("c", "jtt", {0: 0.6, 1: 0.6})])
    jtt = next(r for r in across if r.method == "jtt")
    assert jtt.delta_wga.mean == pytest.approx(0.05) and jtt.paired_with == "a"
    other = pair([_row("a", "erm", {0: 0.5}, config="d1"), _row("c", "jtt", {0: 0.6},
                                                                config="d2")])
    assert next(r for r in other if r.method == "jtt").delta_wga.n == 0
    with pytest.raises(AmbiguousReference, match="ERM rows of a, b"):
        pair([_row("a", "erm", {0: 0.5}), _row("b", "erm", {0: 0.4}),
              _row("c", "jtt", {0: 0.6})])
