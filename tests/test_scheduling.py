"""The sweep's searcher decides which pipeline's trial runs next: the order that keeps every
slot busy to the end (critical path first). No Ray here: the searcher is driven directly,
the way Tune drives it, with trial ids it makes up."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from debias.params import SearchDomain
from debias.search import PipelinePlan, SweepSearcher
from debias.spec import load_spec
from debias.stage_plan import STAGE_PHASE, StagePlanner, _cache_file
from debias.sweep import _plans, pipelines
from tests.conftest import tiny_sweep, write_sweep

LR = SearchDomain("train.lr", "float", 0.01, 0.1, log=True)
_ids = itertools.count()


def _suggest(searcher: SweepSearcher) -> tuple[str, dict[str, Any] | str | None]:
    trial_id = f"t{next(_ids):05d}"
    return trial_id, searcher.suggest(trial_id)


def test_a_search_trial_goes_before_another_pipelines_seeds() -> None:
    """Pipeline a's search ends while b's has trials left: b's search trial is handed out
    before a's seeds (b's search holds up b's whole seeds phase; a seeds trial holds up
    nothing), so the sweep does not end with b's seeds alone on one slot."""
    plans = [PipelinePlan(name, (LR,), "random", num_samples=2, seeds=(0, 1))
             for name in ("a", "b")]
    searcher = SweepSearcher("order", plans, metric="score", mode="max", seed=0)
    a_search = []
    for _ in range(3):  # a, b, a: the searches advance together
        trial_id, config = _suggest(searcher)
        assert isinstance(config, dict) and config["phase"] == "search"
        if config["pipeline"] == "a":
            a_search.append(trial_id)
    assert len(a_search) == 2
    for i, trial_id in enumerate(a_search):
        searcher.on_trial_complete(trial_id, {"score": 0.5 + i})
    assert searcher.search_complete("a") and not searcher.search_complete("b")

    _, config = _suggest(searcher)
    assert isinstance(config, dict)
    assert (config["pipeline"], config["phase"]) == ("b", "search")
    seeds = [_suggest(searcher)[1] for _ in range(2)]
    assert [(c["pipeline"], c["phase"], c["seed"]) for c in seeds if isinstance(c, dict)] == [
        ("a", "seeds", 0), ("a", "seeds", 1)]


def test_a_pipeline_whose_trials_need_stage_tasks_searches_first(tmp_path: Path) -> None:
    """In a study of ERM and JTT, JTT's trials need stage tasks (its identification model and
    error set), and so will each of its seeds: once its stages exist, JTT's search trials go
    before ERM's, so JTT's longer road to the end starts first."""
    sweep = tiny_sweep(tmp_path, name="study", methods=["erm", "jtt"], targets=["Odd"],
                       seeds=[0], jtt={"epochs_id": 1})
    del sweep["method"]
    sweep["search"]["num_samples"] = 3
    spec = load_spec(write_sweep(tmp_path, sweep))
    bases = {p.name: spec.trial_base(p.target, p.method) for p in pipelines(spec)}
    planner = StagePlanner(str(spec.storage / "cache"))
    searcher = SweepSearcher(spec.name, _plans(spec), metric="score", mode="max", seed=0,
                             bases=bases, planner=planner)
    first = [_suggest(searcher)[1] for _ in range(2)]
    assert [c["pipeline"] for c in first if isinstance(c, dict)] == ["erm/Odd", "erm/Odd"]
    # JTT's first config waits for its stages: a stage task comes next, while ERM goes on.
    _, task = _suggest(searcher)
    assert isinstance(task, dict) and task["phase"] == STAGE_PHASE
    assert searcher.pipes["jtt/Odd"].has_stages and not searcher.pipes["erm/Odd"].has_stages
    for request in list(planner._known.values()):  # as if the stage tasks had run
        path = _cache_file(planner.cache_dir, request.stage, request.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        planner.finished(request.key)
    order = [_suggest(searcher)[1] for _ in range(3)]
    assert [c["pipeline"] for c in order if isinstance(c, dict)] == [
        "jtt/Odd", "jtt/Odd", "jtt/Odd"]
