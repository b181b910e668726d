"""SLIM's last-layer mode (DFR-style): the numerics on hand-made data, then the trial on the
embedded dataset: held-out selection, test from the selected grid point, cached stages,
same seed same numbers, resume from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from debias.cache import StageCache
from debias.linear_heads import (
    class_weight_options,
    fit_averaged_head,
    split_halves,
    standardiser,
)
from debias.slim.annotations import group_annotator
from debias.spec import SpecError, validate, with_params
from debias.trainable import build_trial

# --------------------------------------------------------------------------- numerics


def test_split_halves_are_a_stratified_partition_fixed_by_the_seed() -> None:
    y = np.array([0] * 11 + [1] * 6)
    fit, held = split_halves(y, seed=3)
    assert np.intersect1d(fit, held).size == 0
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(len(y)))
    assert [(y[fit] == c).sum() for c in (0, 1)] == [6, 3]
    assert [(y[held] == c).sum() for c in (0, 1)] == [5, 3]
    again, _ = split_halves(y, seed=3)
    other, _ = split_halves(y, seed=4)
    assert np.array_equal(fit, again) and not np.array_equal(fit, other)


def test_class_weight_options_are_dfrs_pairs() -> None:
    assert class_weight_options([1, 2, 10], 2) == [
        {0: 1.0, 1: 1.0}, {0: 2.0, 1: 1.0}, {0: 1.0, 1: 2.0}, {0: 10.0, 1: 1.0},
        {0: 1.0, 1: 10.0}]
    assert len(class_weight_options([3], 3)) == 4  # equal, then each class up-weighted


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)) * np.arange(1, 13) + np.arange(12)  # unequal scales, offsets
    y = (x[:, 0] - 3 * x[:, 1] + rng.normal(size=n) > -2).astype(np.int64)
    return x, y


def test_folded_head_predicts_what_the_standardised_regression_predicts() -> None:
    x, y = _toy(200, 0)
    mean, std = standardiser(x)
    head = fit_averaged_head([(x, y)], c=0.5, class_weight={0: 1.0, 1: 2.0}, n_classes=2,
                             seed=7)  # standardised with the subset's own statistics
    reference = LogisticRegression(C=0.5, l1_ratio=1.0, solver="liblinear",
                                   class_weight={0: 1.0, 1: 2.0}, random_state=7)
    reference.fit((x - mean) / std, y)
    decision = reference.decision_function((x - mean) / std)
    logits = head.logits(x)
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, rtol=1e-9, atol=1e-9)
    assert np.array_equal(head.predict(x), reference.predict((x - mean) / std))


def test_retrains_are_averaged_and_l1_makes_the_head_sparse() -> None:
    (x1, y1), (x2, y2) = _toy(150, 1), _toy(150, 2)
    mean, std = standardiser(np.concatenate([x1, x2]))
    kw: dict[str, Any] = {"class_weight": {0: 1.0, 1: 1.0}, "n_classes": 2,
                          "scaler": (mean, std)}
    both = fit_averaged_head([(x1, y1), (x2, y2)], c=0.3, seed=5, **kw)
    first = fit_averaged_head([(x1, y1)], c=0.3, seed=5, **kw)
    second = fit_averaged_head([(x2, y2)], c=0.3, seed=6, **kw)  # retrain r gets seed + r
    np.testing.assert_allclose(both.weight, (first.weight + second.weight) / 2, atol=1e-12)
    np.testing.assert_allclose(both.bias, (first.bias + second.bias) / 2, atol=1e-12)
    loose = fit_averaged_head([(x1, y1)], c=10.0, seed=5, **kw)
    tight = fit_averaged_head([(x1, y1)], c=0.01, seed=5, **kw)
    assert tight.nonzero < loose.nonzero


def test_a_subset_missing_a_class_is_refused_with_the_knob_to_turn() -> None:
    x, y = _toy(40, 3)
    mean, std = standardiser(x)
    with pytest.raises(ValueError, match="curated_size"):
        fit_averaged_head([(x, y), (x[y == 0], y[y == 0])], c=1.0, class_weight={0: 1, 1: 1},
                          n_classes=2, seed=0, scaler=(mean, std))


def test_group_annotator_takes_the_majority_from_the_training_split() -> None:
    train_y, train_a = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 1, 0])
    # A balanced validation sample has no majority of its own; the training split's decides.
    val_y, val_a = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert group_annotator(val_y, val_a, majority_of=(train_y, train_a)).tolist() == [0, 1, 1, 0]


# --------------------------------------------------------------------------- the trial

SLIM = {"retrain": "last_layer", "budget_per_class": 5, "curated_size": 60, "keep_quantile": 0.0,
        "retrains": 2, "c_grid": [1.0, 0.1], "class_weight_ratios": [1, 3], "embedding": "pca",
        "final_retrains": 3}
GRID_SIZE = 2 * 3


def _config(tmp_path: Path, seed: int = 0, **slim: Any) -> dict[str, Any]:
    spec = validate({
        "name": "ll", "method": "slim", "targets": ["Odd"], "bias_attribute": "Background",
        "dataset": {"name": "synthetic", "image_size": 16, "spurious_correlation": 0.9,
                    "size": 1500},
        "backbone": {"arch": "small_cnn", "weights": "none"},
        "reference": {"epochs": 3, "lr": 0.05}, "slim": {**SLIM, **slim},
        "storage": str(tmp_path)})
    return with_params(spec.trial_base("Odd"), {"seed": seed})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("last_layer")


@pytest.fixture(scope="module")
def first_run(store: Path) -> tuple[Any, list[dict[str, Any]]]:
    trial = build_trial(_config(store), device="cpu")
    return trial, list(trial.epochs())


def test_one_step_per_grid_point_with_test_from_the_final_head(first_run) -> None:
    """The held-out half selects the point; the final head refits it on the curated sets
    (final_retrains fits, standardised with all of validation) and scores the test split."""
    from debias.seeding import derive_seed

    trial, history = first_run
    assert [m["epoch"] for m in history] == list(range(1, GRID_SIZE + 1))
    assert {(m["last_layer/C"], m["last_layer/class_weight/1"]) for m in history} == {
        (c, w) for c in (1.0, 0.1) for w in (1.0, 3.0)}
    scores = [m["val/worst_group_acc"] for m in history]
    best = int(np.argmax(scores))  # first of the ties, as selection only moves on improvement
    final = history[-1]
    assert final["selected/epoch"] == best + 1 and final["selected/score"] == scores[best]
    assert not any(k.startswith("test/") for m in history[:-1] for k in m)
    c, weights = trial.grid[best]
    subsets = trial.method.final_subsets()
    assert len(subsets) == 3  # the curated sets of the two retrains, taken in turn
    view = trial.data.view("val")
    head = fit_averaged_head([(trial.val_x[np.sort(p)], view.y[np.sort(p)]) for p in subsets],
                             c, weights, 2, seed=derive_seed(trial.seed, "last-layer-final"),
                             scaler=standardiser(trial.val_x))
    assert final["test/worst_group_acc"] == trial.evaluate("test", head)["test/worst_group_acc"]
    assert final["last_layer/final_fit_size"] == pytest.approx(
        np.mean([len(p) for p in subsets]))
    assert final["train/loss"] >= 0.0 and history[0]["last_layer/grid_size"] == GRID_SIZE


def trial_seed(trial: Any, index: int) -> int:
    from debias.seeding import derive_seed

    return derive_seed(trial.seed, "last-layer", index)


def test_validation_is_split_into_a_fitted_half_and_a_held_out_half(first_run) -> None:
    trial, history = first_run
    fit_half = np.setdiff1d(np.arange(len(trial.data.view("val"))), trial.held_out)
    for curation in trial.method.curations:
        assert curation["split"] == "val"
        assert np.isin(curation["positions"].numpy(), fit_half).all()
        assert np.isin(curation["annotated_positions"].numpy(), fit_half).all()
    # The retrains re-curate with their own seeds but show the annotator the same images,
    # from one embedding of the fitted half.
    assert trial.cache_events["cache/computed/curation"] == 2
    assert trial.cache_events["cache/computed/space"] == 1
    a, b = trial.method.curations
    assert np.array_equal(a["annotated_positions"], b["annotated_positions"])
    assert not np.array_equal(np.sort(a["positions"]), np.sort(b["positions"]))
    # val/* is scored on the held-out half only (the counts say so, and so do accuracies).
    counts = sum(v for k, v in history[0].items() if k.startswith("val/group_count/"))
    assert counts == len(trial.held_out) == history[0]["last_layer/val_selection_size"]
    c, weights = trial.grid[0]
    head = fit_averaged_head(trial.subsets, c, weights, 2, seed=trial_seed(trial, 0))
    view = trial.data.view("val")
    y, a = view.y[trial.held_out], view.a[trial.held_out]
    correct = head.predict(trial.features["val"]) == y
    for g in ((0, 0), (0, 1), (1, 0), (1, 1)):
        members = (y == g[0]) & (a == g[1])
        assert history[0][f"val/group_acc/{g[0]}_{g[1]}"] == pytest.approx(correct[members].mean())
    assert history[0]["slim/annotated"] == 10


def test_same_seed_same_numbers_and_the_stages_come_from_the_cache(store, first_run) -> None:
    _, history = first_run
    StageCache.reset_events()
    again = build_trial(_config(store), device="cpu")
    assert again.cache_events.get("cache/computed/curation", 0) == 0
    assert again.cache_events["cache/reused/curation"] == 2
    assert again.cache_events["cache/reused/gradcam"] >= 1
    assert _numbers(list(again.epochs())) == _numbers(history)


def test_a_resumed_trial_ends_with_the_metrics_of_an_uninterrupted_one(store, first_run,
                                                                       tmp_path: Path) -> None:
    _, history = first_run
    interrupted = build_trial(_config(store), device="cpu")
    steps = interrupted.epochs()
    for _ in range(3):
        next(steps)
    interrupted.save(tmp_path / "state.pt")
    resumed = build_trial(_config(store), device="cpu")
    resumed.load(tmp_path / "state.pt")
    rest = list(resumed.epochs())
    assert [m["epoch"] for m in rest] == list(range(4, GRID_SIZE + 1))
    assert _numbers(rest) == _numbers(history[3:])


def test_another_trial_seed_reruns_the_reference_the_sample_and_the_curation(
        store, first_run) -> None:
    """A reported seed re-runs everything random in SLIM's pipeline (with a simulated
    annotator; a person's file is the exception, see the last test)."""
    trial, _ = first_run
    StageCache.reset_events()
    other = build_trial(_config(store, seed=1), device="cpu")
    assert other.reference_key != trial.reference_key
    assert other.cache_events["cache/computed/reference"] == 1
    assert other.cache_events["cache/computed/gradcam"] == 1
    assert not np.array_equal(other.held_out, trial.held_out)
    assert not np.array_equal(other.method.curations[0]["annotated_positions"],
                              trial.method.curations[0]["annotated_positions"])


def _numbers(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    skip = ("cache/", "artifacts/")
    return [{k: v for k, v in m.items() if isinstance(v, float) and not k.startswith(skip)}
            for m in history]


# --------------------------------------------------------------------------- the sweep file


def _raw(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": "x", "method": "slim", "targets": ["Odd"],
                           "bias_attribute": "Background", "dataset": {"name": "synthetic"}}
    raw.update(over)
    return raw


def test_last_layer_knobs_are_checked_with_what_is_allowed() -> None:
    with pytest.raises(SpecError) as err:
        validate(_raw(slim={"retrain": "last_layer", "c_grid": [1.0, -0.1],
                            "class_weight_ratios": "3", "retrains": 0}))
    text = str(err.value)
    assert "slim.c_grid: got [1.0, -0.1]; expected a non-empty list of distinct numbers > 0" \
        in text
    assert "slim.class_weight_ratios: got '3'" in text
    assert "slim.retrains: got 0" in text


def test_asha_and_annotation_files_refuse_what_last_layer_mode_cannot_do() -> None:
    with pytest.raises(SpecError, match=r"got ASHA; expected null when slim can run last-layer"):
        validate(_raw(slim={"retrain": "full"}, scheduler={"asha": {"grace_period": 1}},
                      search={"space": {"slim.retrain": {"choice": ["full", "last_layer"]}}}))
    with pytest.raises(SpecError, match=r"slim.budget_per_class searched with "
                                        r"slim.annotator 'csv'"):
        validate(_raw(slim={"annotator": "csv", "annotations": "a.csv"},
                      search={"space": {"slim.budget_per_class": {"int": [5, 10]}}}))
    with pytest.raises(SpecError, match=r"backbone.arch searched with slim.annotator 'csv'"):
        validate(_raw(slim={"annotator": "csv", "annotations": "a.csv"},
                      search={"space": {"backbone.arch": {"choice": ["small_cnn", "resnet18"]}}}))
    with pytest.raises(SpecError, match=r"train.lr searched, but method slim trains no SGD"):
        validate(_raw(slim={"retrain": "last_layer"},
                      search={"space": {"train.lr": {"float": [0.01, 0.1]}}}))
    # Retraining knobs are free to vary with a person's annotations, the mode included (the
    # request then covers both splits).
    validate(_raw(slim={"annotator": "csv", "annotations": "a.csv"},
                  search={"space": {"slim.retrains": {"int": [1, 5]},
                                    "slim.retrain": {"choice": ["full", "last_layer"]}}}))


def test_one_annotation_file_answers_both_retrain_modes_of_a_sweep(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A person annotated for full retraining; the sweep then searches the retrain mode too.
    Before any trial, the file gets rows for the fitted half of validation, the answers
    already given kept; filled in, each mode's curation reads its own rows."""
    import csv

    from debias.cli import main
    from debias.data import load_grouped
    from debias.slim.modes import validation_halves
    from debias.spec import load_spec
    from tests.conftest import tiny_sweep, write_sweep

    csv_path = tmp_path / "ann.csv"
    slim = {**SLIM, "retrain": "full", "annotator": "csv", "annotations": str(csv_path)}
    sweep = tiny_sweep(tmp_path, method="slim", targets=["Odd"], reference={"epochs": 1},
                       slim=slim, search={"algorithm": "grid", "space": {
                           "slim.retrain": {"choice": ["full"]}}})

    def rows() -> list[dict[str, str]]:
        with csv_path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def answer(split: str) -> None:
        filled = [{**r, "annotation": "1" if r["split"] == split else r["annotation"]}
                  for r in rows()]
        with csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(filled[0]))
            writer.writeheader()
            writer.writerows(filled)

    assert main([str(write_sweep(tmp_path, sweep))]) == 1
    assert "annotation request was written there" in capsys.readouterr().err
    assert [r["split"] for r in rows()] == ["train"] * 10  # 5 per class
    answer("train")

    sweep["search"]["space"]["slim.retrain"] = {"choice": ["full", "last_layer"]}
    path = write_sweep(tmp_path, sweep)
    assert main([str(path), "--dry-run"]) == 0
    assert "no rows yet for split(s) val" in capsys.readouterr().out
    assert main([str(path)]) == 1
    assert "10 rows for another retrain mode were added" in capsys.readouterr().err
    by_split = {s: [r for r in rows() if r["split"] == s] for s in ("train", "val")}
    assert [len(v) for v in by_split.values()] == [10, 10]
    assert {r["annotation"] for r in by_split["train"]} == {"1"}  # kept
    assert {r["annotation"] for r in by_split["val"]} == {""}
    data = load_grouped({"name": "synthetic", "image_size": 16, "size": 1500}, "Odd",
                        "Background")
    # A person annotates once: the sample (and so the halves) come from the search's seed.
    fit_half, _ = validation_halves(data, load_spec(path).search_seed)
    assert {r["id"] for r in by_split["val"]} <= {str(i) for i in data.view("val").ids[fit_half]}
    answer("val")

    base = load_spec(path).trial_base("Odd")
    last = build_trial(with_params(base, {"seed": 0, "slim.retrain": "last_layer"}), "cpu")
    assert all(c["annotator"] == "csv" and not c["simulated"] for c in last.method.curations)
    assert next(last.epochs())["slim/simulated_annotator"] == 0.0
    full = build_trial(with_params(base, {"seed": 0, "train.epochs": 1}), "cpu")
    assert full.method.curation["annotator"] == "csv" and full.method.curation["split"] == "train"
