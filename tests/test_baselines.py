"""The standard baselines (GroupDRO, JTT, DFR, balanced ERM): their numerics on hand-made
tensors, their stages, and the rule every method lives by: a method that declares it uses no
bias labels is given none, so permuting the training split's bias labels changes nothing it
computes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from debias.data import BiasLabelsHidden, load_grouped
from debias.engine import Trainer
from debias.last_layer import LastLayerTrial
from debias.methods import resolve_method
from debias.methods.dfr import balanced_draw
from debias.methods.erm import balanced_draws, group_subsample
from debias.methods.groupdro import GroupWeights
from debias.methods.jtt import upsampled_positions
from debias.spec import validate, with_params
from debias.stages import predict, reference_model
from debias.trainable import build_trial

# --------------------------------------------------------------------------- numerics


def test_groupdro_weight_update_matches_the_paper_by_hand() -> None:
    """q_g <- q_g exp(eta (L_g + C / sqrt(n_g))), normalised; loss = sum_g q_g L_g."""
    sizes = torch.tensor([4, 2, 1, 9])
    weights = GroupWeights(sizes, eta=0.5, adjustment=1.0)
    losses = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 3])
    loss = weights.step(losses, groups)
    group_loss = [1.5, 3.0, 0.0, 0.5]  # group 2 has no member in the batch
    raw = [0.25 * math.exp(0.5 * (g + 1.0 / math.sqrt(n)))
           for g, n in zip(group_loss, [4, 2, 1, 9], strict=True)]
    q = [r / sum(raw) for r in raw]
    np.testing.assert_allclose(weights.q.numpy(), q, rtol=1e-12)
    assert float(loss) == pytest.approx(sum(qi * g for qi, g in zip(q, group_loss, strict=True)))
    # A second step starts from the updated q (exponentiated gradient ascent accumulates).
    weights.step(losses, groups)
    raw2 = [qi * math.exp(0.5 * (g + 1.0 / math.sqrt(n)))
            for qi, g, n in zip(q, group_loss, [4, 2, 1, 9], strict=True)]
    np.testing.assert_allclose(weights.q.numpy(), [r / sum(raw2) for r in raw2], rtol=1e-12)
    # The worst group gains weight; with eta = 0 nothing moves.
    assert int(torch.argmax(weights.q)) == 1
    still = GroupWeights(sizes, eta=0.0, adjustment=0.0)
    still.step(losses, groups)
    assert torch.allclose(still.q, torch.full((4,), 0.25, dtype=torch.float64))


def test_jtt_adds_lambda_copies_of_every_error_to_the_training_set() -> None:
    """The reference's ConcatDataset([train, Subset(train, E * lambda_up)]): every error
    example lambda_up + 1 times, every other example once."""
    errors = np.array([False, True, False, True, True])
    positions = upsampled_positions(5, errors, lambda_up=4)
    assert np.bincount(positions, minlength=5).tolist() == [1, 5, 1, 5, 5]
    assert np.bincount(upsampled_positions(5, errors, 1), minlength=5).tolist() == [
        1, 2, 1, 2, 2]


def test_balancing_samplers_subsample_and_reweight_groups() -> None:
    groups = np.array([0] * 50 + [1] * 5 + [2] * 20 + [3] * 5)
    subset = group_subsample(groups, seed=3)
    assert np.bincount(groups[subset]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(subset, group_subsample(groups, seed=3))
    assert not np.array_equal(subset, group_subsample(groups, seed=4))
    draws = balanced_draws(groups, 40_000, np.random.default_rng(0))
    share = np.bincount(groups[draws]) / 40_000
    np.testing.assert_allclose(share, 0.25, atol=0.01)
    drawn = balanced_draw(groups, np.random.default_rng(1))
    assert np.bincount(groups[drawn]).tolist() == [5, 5, 5, 5]


# --------------------------------------------------------------------------- trials

TINY: dict[str, Any] = {
    "name": "b", "targets": ["Odd"], "bias_attribute": "Background",
    "dataset": {"name": "synthetic", "image_size": 16, "spurious_correlation": 0.9,
                "size": 1500},
    "backbone": {"arch": "small_cnn", "weights": "none"},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05},
    "reference": {"epochs": 1, "batch_size": 128},
}


def _config(tmp_path: Path, method: str, **sections: Any) -> dict[str, Any]:
    spec = validate({**TINY, "method": method, **sections, "storage": str(tmp_path)})
    return with_params(spec.trial_base("Odd"), {"seed": 0})


def test_jtt_error_set_eval_after_is_what_the_cached_identification_model_gets_wrong(
        tmp_path: Path) -> None:
    config = _config(tmp_path, "jtt", jtt={"epochs_id": 1, "lambda_up": 3,
                                           "error_predictions": "eval_after"})
    trial = build_trial(config, "cpu")
    assert trial.cache_events["cache/computed/reference"] == 1
    data = trial.data
    model = reference_model(config, data, trial.cache, torch.device("cpu"), epochs=1)
    wrong = (predict(model, data, "train", torch.device("cpu")).numpy()
             != data.view("train").y)
    assert np.array_equal(trial.method.errors, wrong) and 0 < wrong.sum() < len(wrong)
    assert len(trial.method.train_positions()) == len(wrong) + 3 * wrong.sum()
    first = next(trial.epochs())
    assert first["jtt/error_set_size"] == wrong.sum()
    assert first["stage/jtt_errors"] and first["stage/reference"]
    # Another trial with the same T reuses both stages.
    again = build_trial(with_params(config, {"jtt.lambda_up": 5}), "cpu")
    assert again.cache_events.get("cache/computed/reference", 0) == 0
    assert again.cache_events["cache/reused/jtt_errors"] == 1


def test_dfr_fits_on_group_balanced_draws_of_one_half_and_selects_on_the_other(
        tmp_path: Path) -> None:
    config = _config(tmp_path, "dfr", dfr={"retrains": 3, "c_grid": [1.0, 0.1]})
    trial = build_trial(config, "cpu")
    assert isinstance(trial, LastLayerTrial)
    history = list(trial.epochs())
    assert len(history) == 2  # the C grid; class weights default to equal only
    val = trial.data.view("val")
    fit_half = np.setdiff1d(np.arange(len(val)), trial.held_out)
    subsets = trial.method.fit_subsets(fit_half)
    assert len(subsets) == 3
    for positions in subsets:
        assert np.isin(positions, fit_half).all()
        counts = np.bincount(val.group[positions], minlength=4)
        assert len(set(counts.tolist())) == 1  # every group at the smallest's size
    assert not np.array_equal(subsets[0], subsets[1])  # other draws, averaged
    held = sum(v for k, v in history[0].items() if k.startswith("val/group_count/"))
    assert held == len(trial.held_out)
    assert history[-1]["selected/epoch"] in (1, 2)


def test_a_method_that_uses_no_bias_labels_cannot_read_them(tmp_path: Path) -> None:
    trial = build_trial(_config(tmp_path, "erm"), "cpu")
    with pytest.raises(BiasLabelsHidden, match="declares"):
        _ = trial.method.data.view("train").a
    assert trial.method.data.view("val").a is not None  # evaluation labels stay
    oracle = build_trial(_config(tmp_path, "groupdro"), "cpu")
    assert len(oracle.method.data.view("train").a) == len(oracle.data.view("train"))


# --------------------------------------------------------------------------- permuted labels

#: Numbers that describe the training bias labels themselves: they may change.
DESCRIBES_TRAIN_BIAS = ("val/weighted_acc", "test/weighted_acc", "clusterfix/cluster_purity/",
                        "clusterfix/mean_purity", "slim/curated_group/", "jtt/error_group/",
                        "selected/score")


def _permuted(data: Any, seed: int = 0) -> Any:
    a = np.array(data.a)
    rows = np.flatnonzero(np.asarray(data.split) == 0)
    a[rows] = np.random.default_rng(seed).permutation(a[rows])
    assert (a != data.a).any()
    return dataclasses.replace(data, a=a)


def _run(config: dict[str, Any], data: Any) -> tuple[list[dict[str, float]], dict[str, Any]]:
    cls = resolve_method(config["method"])
    kind = cls.trial_kind(cls.params_of(config))
    trial = (Trainer if kind == "epochs" else LastLayerTrial)(config, cls, "cpu", data=data)
    history = list(trial.epochs())
    weights = (trial.model.state_dict() if kind == "epochs"
               else {"head": trial.selected_head.weight})
    return history, weights


def _comparable(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if isinstance(v, float) and k.startswith(
        ("train/", "val/", "test/")) and not k.startswith(DESCRIBES_TRAIN_BIAS)}
        for m in history]


# The same rule for every registered method, label-free ones included, is part of the
# registry's contract (tests/test_contract.py).


def test_permuting_training_bias_labels_changes_what_an_oracle_learns(tmp_path: Path) -> None:
    """The other side of the same rule: GroupDRO reads them, so its training changes."""
    data = load_grouped(TINY["dataset"], "Odd", "Background")
    config = _config(tmp_path, "groupdro", groupdro={"eta": 1.0})
    _, w1 = _run(config, data)
    _, w2 = _run(config, _permuted(data))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
