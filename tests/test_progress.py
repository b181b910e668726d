"""The live view: true counts (running = running in Tune; each phase its own counts), the
selection metric named with its unit, a time estimate that moves no faster than the clock,
lines only on change, starved trials flagged; and configs at 3 significant digits."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace
from typing import Any

import pytest

from debias.display import format_config, format_duration, format_metric, format_value
from debias.params import SearchDomain
from debias.progress import SweepProgress, smooth_eta, sweep_view
from debias.search import PipelinePlan, SweepSearcher

LR = SearchDomain(path="train.lr", kind="float", low=0.01, high=0.1, log=True)
METRIC = "val/worst_group_acc"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("debias.progress.time", fake)
    return fake


def _searcher(name: str, pipelines: tuple[str, ...] = ("erm/Odd",), samples: int = 3,
              seeds: tuple[int, ...] = (0, 1, 2), mode: str = "max") -> SweepSearcher:
    plans = [PipelinePlan(name=p, domains=(LR,), algorithm="random", num_samples=samples,
                          seeds=seeds) for p in pipelines]
    return SweepSearcher(name, plans, metric="selected/score", mode=mode, seed=0)


class Trials:
    """Tune's side: trial objects with a status, a config and a last result."""

    def __init__(self, searcher: SweepSearcher) -> None:
        self.searcher = searcher
        self.all: dict[str, SimpleNamespace] = {}
        self.count = 0

    def start(self, status: str = "RUNNING", **result: Any) -> str:
        trial_id = self.try_start(status, **result)
        assert trial_id is not None, "the searcher had nothing to hand out"
        return trial_id

    def try_start(self, status: str = "RUNNING", **result: Any) -> str | None:
        trial_id = f"t{self.count + 1}"
        config = self.searcher.suggest(trial_id)
        if not isinstance(config, dict):
            return None
        self.count += 1
        self.all[trial_id] = SimpleNamespace(trial_id=trial_id, status=status, config=config,
                                             last_result=dict(result))
        return trial_id

    def finish(self, trial_id: str, score: float, seconds: float = 10.0) -> None:
        trial = self.all[trial_id]
        trial.status = "TERMINATED"
        trial.last_result = {"selected/score": score, "time_total_s": seconds}
        self.searcher.on_trial_complete(trial_id, trial.last_result)

    @property
    def list(self) -> list[SimpleNamespace]:
        return list(self.all.values())


def test_running_is_what_tune_runs_and_each_phase_counts_its_own_trials() -> None:
    searcher = _searcher("counts")
    trials = Trials(searcher)
    a, b = trials.start(), trials.start()
    trials.start(status="PENDING")  # handed out, waiting for a slot: not running
    view = sweep_view("counts", METRIC, "max", trials.list, searcher.pipes)
    assert (view.running, view.done, view.total) == (2, 0, 6)
    (pipe,) = view.pipelines
    assert (pipe.phase, pipe.done, pipe.total, pipe.running) == ("search", 0, 3, 2)

    for trial_id, score in ((a, 0.40), (b, 0.612)):
        trials.finish(trial_id, score)
    trials.all["t3"].status = "RUNNING"
    trials.finish("t3", 0.5)
    seed = trials.start()
    view = sweep_view("counts", METRIC, "max", trials.list, searcher.pipes)
    (pipe,) = view.pipelines
    # The seeds phase counts its seeds only, never the search's 3 finished trials.
    assert (pipe.phase, pipe.done, pipe.total, pipe.running) == ("seeds", 0, 3, 1)
    assert pipe.best == pytest.approx(0.612)
    assert "best val/worst_group_acc 61.2%" in view.lines()[0]
    trials.finish(seed, 0.3)
    view = sweep_view("counts", METRIC, "max", trials.list, searcher.pipes)
    assert view.pipelines[0].done == 1 and view.done == 4 and view.running == 0


def test_a_minimised_metric_without_unit() -> None:
    searcher = _searcher("loss", samples=2, mode="min")
    trials = Trials(searcher)
    a, b = trials.start(), trials.start()
    trials.finish(a, 0.25)
    trials.finish(b, 0.123456)
    view = sweep_view("loss", "val/loss", "min", trials.list, searcher.pipes)
    assert "best val/loss 0.123" in view.lines()[0] and "%" not in view.lines()[0]


def test_starved_trials_are_flagged_from_their_last_result() -> None:
    searcher = _searcher("starved")
    trials = Trials(searcher)
    trials.start(**{"perf/data_wait_frac": 0.5, "perf/train_images_per_s": 800.0})
    trials.start(**{"perf/data_wait_frac": 0.2})
    trials.start()  # no perf metrics yet: no flag
    view = sweep_view("starved", METRIC, "max", trials.list, searcher.pipes)
    assert view.starved == 1
    assert "starved: 1 trial (data wait > 33%)" in view.header(5, math.nan, False)
    trials.all["t2"].last_result["perf/data_wait_frac"] = 0.4
    view = sweep_view("starved", METRIC, "max", trials.list, searcher.pipes)
    assert "starved: 2 trials (data wait > 33%)" in view.header(5, math.nan, False)


def test_log_lines_only_on_change_and_only_the_pipelines_that_moved(clock: Clock) -> None:
    searcher = _searcher("log", pipelines=("erm/Odd", "jtt/Odd"), samples=2, seeds=(0,))
    trials = Trials(searcher)
    progress = SweepProgress("log", "selected/score", "max", label=METRIC, tty=False,
                             interval_s=15)
    progress.setup(start_time=clock.now)
    a = trials.start()  # erm/Odd
    b = trials.start()  # jtt/Odd
    first = progress.render(trials.list).splitlines()
    assert first[0].startswith("sweep 'log': 0/6 trials done, 2 running | 0s elapsed")
    assert [line.split()[0] for line in first[1:]] == ["erm/Odd", "jtt/Odd"]

    clock.now += 20
    assert not progress.should_report(trials.list)  # nothing changed: nothing due
    assert progress.render(trials.list) == ""

    trials.finish(a, 0.7)
    clock.now += 20
    assert progress.should_report(trials.list)
    second = progress.render(trials.list).splitlines()
    assert len(second) == 2 and second[1].split()[:2] == ["erm/Odd", "search"]
    assert "1/2 done" in second[1] and "best val/worst_group_acc 70.0%" in second[1]

    clock.now += 5  # changed, but within the interval: wait
    trials.finish(b, 0.6)
    assert not progress.should_report(trials.list)

    # A minute with nothing new: one heartbeat line, saying where running trials are.
    c = trials.start(epoch=3)
    progress.render(trials.list)
    clock.now += 61
    assert progress.should_report(trials.list)
    trials.all[c].last_result["epoch"] = 4
    beat = progress.render(trials.list).splitlines()
    assert len(beat) == 1 and beat[0].endswith("running trials at epoch 4")


def test_no_printed_line_repeats_the_one_before_except_for_its_clock(clock: Clock) -> None:
    import re

    searcher = _searcher("quiet", pipelines=("erm/Odd", "jtt/Odd", "groupdro/Odd"),
                         samples=3, seeds=(0, 1, 2))
    trials = Trials(searcher)
    progress = SweepProgress("quiet", "selected/score", "max", label=METRIC, tty=False)
    progress.setup(start_time=clock.now)
    printed: list[str] = []
    started: dict[str, float] = {}
    score = 0.3
    for _ in range(500):  # the whole sweep on 2 slots, 14 s a trial, Tune asking every 2 s
        clock.now += 2
        for trial_id, since in list(started.items()):
            if clock.now - since >= 14:
                score += 0.01
                trials.finish(trial_id, score, seconds=14)
                del started[trial_id]
        while len(started) < 2 and (trial_id := trials.try_start()) is not None:
            started[trial_id] = clock.now
        if progress.should_report(trials.list):
            text = progress.render(trials.list)
            printed += text.splitlines() if text else []
        if all(p.finished() for p in searcher.pipes.values()):
            break
    assert all(p.finished() for p in searcher.pipes.values())
    printed += progress.render(trials.list, done=True).splitlines()
    unclocked = [re.sub(r"\d+m\d+s|\d+s", "T", line) for line in printed]
    assert all(a != b for a, b in itertools.pairwise(unclocked)), printed
    final = [line for line in printed if line.startswith("sweep ")][-1]
    assert final.startswith("sweep 'quiet': 18/18 trials done | finished in ")
    assert len(printed) < 30, "\n".join(printed)  # a block per 30 s of a 2-minute sweep


def test_time_left_moves_no_faster_than_the_clock(clock: Clock) -> None:
    assert smooth_eta(40.0, 162.0, 10.0) == pytest.approx(142.0)  # at most dt beyond the clock
    assert smooth_eta(500.0, 162.0, 10.0) == pytest.approx(162.0)
    assert smooth_eta(150.0, 162.0, 10.0) == pytest.approx(150.0)  # within: the estimate
    assert smooth_eta(30.0, None, 0.0) == 30.0  # the first estimate is shown as it is
    assert smooth_eta(math.nan, 100.0, 10.0) == pytest.approx(90.0)

    searcher = _searcher("eta", samples=3, seeds=(0, 1, 2))
    trials = Trials(searcher)
    progress = SweepProgress("eta", "selected/score", "max", label=METRIC, tty=False)
    progress.setup(start_time=clock.now)
    a, b = trials.start(), trials.start()
    clock.now += 100
    trials.finish(a, 0.5, seconds=100)  # a slow first trial: a long estimate
    view_text = progress.render(trials.list)
    first = _left(view_text)
    trials.finish(b, 0.6, seconds=5)  # then a fast one: the raw estimate halves
    clock.now += 10
    second = _left(progress.render(trials.list))
    assert first - 20 <= second <= first


def _left(text: str) -> float:
    import re

    found = re.search(r"~(?:(\d+)m)?(\d+)s left", text)
    assert found, text
    return 60 * int(found.group(1) or 0) + int(found.group(2))


def test_terminal_redraws_one_block_in_place(clock: Clock) -> None:
    searcher = _searcher("tty", pipelines=("erm/Odd", "jtt/Odd"))
    trials = Trials(searcher)
    progress = SweepProgress("tty", "selected/score", "max", label=METRIC, tty=True)
    trials.start()
    first = progress.render(trials.list)
    assert first.startswith("[") and "\x1b[" not in first and len(first.splitlines()) == 3
    clock.now += 1
    second = progress.render(trials.list)
    assert second.startswith("\x1b[3F\x1b[J")


def test_values_are_printed_at_three_significant_digits() -> None:
    assert format_value(0.048071425018349025) == "0.0481"
    assert format_value("0.048071425018349025") == "0.0481"  # as MLflow returns params
    assert format_value("1e-05") == "1e-05" and format_value(123456.0) == "1.23e+05"
    assert format_value(10) == "10" and format_value("20") == "20"
    assert format_value("adam") == "adam" and format_value(True) == "True"
    assert format_config({"train.lr": 0.048071425018349025, "train.epochs": 10,
                          "jtt.lambda_up": "6"}) == \
        "jtt.lambda_up=6, train.epochs=10, train.lr=0.0481"
    assert format_metric("val/worst_group_acc", 0.61234) == "61.2%"
    assert format_metric("val/loss", 0.0123456) == "0.0123"
    assert format_duration(162) == "2m42s" and format_duration(math.nan) == "?"
