"""The search is what it says: TPE gets model-based trials at the shipped budgets, every
algorithm is an Optuna sampler behind one ask/tell, each trial knows which sampler drew it,
ASHA's early stops are pruned trials, and ASHA's rungs survive a restore. No Ray here: the
searcher and the scheduler are driven the way Tune drives them."""

from __future__ import annotations

import itertools
import math
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from debias.params import SearchDomain
from debias.search import PipelinePlan, PipelineScheduler, SweepSearcher, startup_trials
from debias.spec import SpecError, load_spec
from debias.sweep import _plans, describe_plan
from tests.conftest import REPO, tiny_sweep, write_sweep

LR = SearchDomain("train.lr", "float", 1e-4, 1e-1, log=True)
WD = SearchDomain("train.weight_decay", "float", 1e-5, 1e-1, log=True)
_ids = itertools.count()


def _run(searcher: SweepSearcher, score: Any, n: int) -> list[dict[str, Any]]:
    """Hand out and complete ``n`` trials one after another, as one slot would."""
    out = []
    for _ in range(n):
        trial_id = f"t{next(_ids):05d}"
        config = searcher.suggest(trial_id)
        assert isinstance(config, dict)
        out.append(config)
        searcher.on_trial_complete(trial_id, {"score": score(config)})
    return out


def test_startup_trials_scale_with_the_budget() -> None:
    assert [startup_trials(n) for n in (1, 2, 3, 4, 8, 16, 32, 100)] == [
        1, 2, 2, 2, 3, 6, 10, 10]
    assert startup_trials(8, given=5) == 5 and startup_trials(4, given=9) == 4


def test_tpe_suggestions_after_the_startup_follow_the_reported_scores() -> None:
    """At an 8-trial budget: 3 random start-up trials (identical whatever the scores), then 5
    model-based ones, which move toward whatever scored well: high lr under one objective,
    low lr under the opposite one."""
    def searcher() -> SweepSearcher:
        plan = PipelinePlan("p", (LR, WD), "optuna", num_samples=8, seeds=(0,))
        return SweepSearcher("tpe", [plan], metric="score", mode="max", seed=3)

    up = _run(searcher(), lambda c: math.log(c["train.lr"]), 8)
    down = _run(searcher(), lambda c: -math.log(c["train.lr"]), 8)
    assert [c["sampler"] for c in up] == ["tpe-startup"] * 3 + ["tpe"] * 5
    assert [c["train.lr"] for c in up[:3]] == [c["train.lr"] for c in down[:3]]
    assert [c["train.lr"] for c in up[3:]] != [c["train.lr"] for c in down[3:]]
    mean_log = [sum(math.log(c["train.lr"]) for c in cs[3:]) / 5 for cs in (up, down)]
    assert mean_log[0] > mean_log[1]


def test_random_and_grid_are_optuna_samplers_tagged_as_such() -> None:
    a = SearchDomain("train.batch_size", "choice", values=(32, 64))
    b = SearchDomain("train.optimizer", "choice", values=("sgd", "adam", "adamw"))
    grid = SweepSearcher("grid", [PipelinePlan("g", (a, b), "grid", num_samples=1, seeds=(0,))],
                         metric="score", mode="max", seed=0)
    configs = _run(grid, lambda c: 0.5, 6)
    assert {(c["train.batch_size"], c["train.optimizer"]) for c in configs} == set(
        itertools.product((32, 64), ("sgd", "adam", "adamw")))
    assert {c["sampler"] for c in configs} == {"grid"}
    assert grid.search_complete("g")
    random = SweepSearcher("random", [PipelinePlan("r", (LR,), "random", num_samples=4,
                                                   seeds=(0,))], metric="score", mode="max",
                           seed=0)
    configs = _run(random, lambda c: c["train.lr"], 4)
    assert {c["sampler"] for c in configs} == {"random"}
    assert len({c["train.lr"] for c in configs}) == 4
    assert all(1e-4 <= c["train.lr"] <= 1e-1 for c in configs)


def _ten_epochs(config: Any) -> int:
    return 10


def test_a_trial_asha_stopped_is_told_to_optuna_as_pruned() -> None:
    plan = PipelinePlan("p", (LR,), "optuna", num_samples=2, seeds=(0,),
                        planned_steps=_ten_epochs)
    searcher = SweepSearcher("prune", [plan], metric="score", mode="max", seed=0)
    first, second = "a1", "a2"
    assert isinstance(searcher.suggest(first), dict)
    assert isinstance(searcher.suggest(second), dict)
    searcher.on_trial_complete(first, {"score": 0.4, "training_iteration": 3})
    searcher.on_trial_complete(second, {"score": 0.6, "training_iteration": 10})
    states = [t.state for t in searcher.pipes["p"].study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert searcher.pipes["p"].trials[first].pruned
    assert not searcher.pipes["p"].trials[second].pruned
    # The searcher's state (studies, asked trials) survives Tune's pickling.
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.best("p")[0] == second


def _trial(trial_id: str) -> Any:
    return SimpleNamespace(trial_id=trial_id, config={"phase": "search", "pipeline": "p"})


def test_asha_rungs_survive_a_restore(tmp_path: Path) -> None:
    """Ray restores a scheduler as it was created; ours reads the rungs it saved. Three
    trials reach the first rung (epoch 1) with scores 0.9, 0.8, 0.7: after a restore, a
    fourth trial scoring 0.1 there is stopped only because the rung remembers the others."""
    path = tmp_path / "rungs.pkl"

    def fresh() -> PipelineScheduler:
        return PipelineScheduler("score", "max", {"grace_period": 1, "reduction_factor": 3},
                                 {"p": 9}, state_path=str(path))

    created = pickle.dumps(fresh())  # what Tune keeps of the scheduler at the start
    first = pickle.loads(created)
    for i, score in enumerate((0.9, 0.8, 0.7)):
        trial = _trial(f"t{i}")
        first.on_trial_add(None, trial)
        first.on_trial_result(None, trial, {"training_iteration": 1, "score": score})
    restored = pickle.loads(created)
    late = _trial("t9")
    restored.on_trial_add(None, late)
    assert restored.on_trial_result(None, late, {"training_iteration": 1, "score": 0.1}) \
        == TrialScheduler.STOP
    # Without the saved rungs the same trial would be the first at its rung, and go on.
    path.unlink()
    empty = pickle.loads(created)
    empty.on_trial_add(None, late)
    assert empty.on_trial_result(None, late, {"training_iteration": 1, "score": 0.1}) \
        == TrialScheduler.CONTINUE


def test_the_plan_says_how_many_trials_each_sampler_draws(tmp_path: Path) -> None:
    spec = load_spec(REPO / "sweeps" / "slim_celeba.yaml")
    assert next(p.samplers() for p in _plans(spec)) == {"tpe-startup": 3, "tpe": 5}
    assert "8 trial(s) per target (3 tpe-startup, 5 tpe)" in describe_plan(spec)
    sweep = tiny_sweep(tmp_path)
    sweep["search"].update(algorithm="random", num_samples=3)
    assert "(3 random)" in describe_plan(load_spec(write_sweep(tmp_path, sweep)))


def test_asha_with_a_searched_cosine_schedule_length_is_refused(tmp_path: Path) -> None:
    """ASHA compares trials at equal epochs; with cosine schedules of searched lengths, equal
    epochs are unequal progress (the short schedule has annealed), so short schedules win."""
    sweep = tiny_sweep(tmp_path)
    sweep["train"].update(scheduler="cosine", epochs=4)
    sweep["search"]["space"]["train.epochs"] = {"choice": [2, 4]}
    sweep["scheduler"] = {"asha": {"grace_period": 1, "reduction_factor": 2}}
    with pytest.raises(SpecError, match=r"scheduler: got ASHA with train\.epochs searched"):
        load_spec(write_sweep(tmp_path, sweep))
    sweep["train"]["scheduler"] = "none"
    load_spec(write_sweep(tmp_path, sweep))
