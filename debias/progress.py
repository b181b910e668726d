"""What a person sees while a sweep runs: one compact, true view of every pipeline.

- **running** counts trials Tune is running now (not trials handed out and waiting for a
  slot); shared-stage tasks are counted apart.
- Per pipeline, **its phase's own counts**: ``search 2/3 done`` while searching,
  ``seeds 1/3 done`` once its seeds run (the search's trials are not counted again), and the
  best search score **named, with its unit** (``best val/worst_group_acc 61.2%``).
- **Time left** = work left / slots: each waiting trial costs its pipeline's mean trial time
  so far, each running one what is left of it; slots = the most trials seen running at once.
  A new estimate never moves more than the time that passed since the last one beyond the
  clock itself (``|new - (old - dt)| <= dt``), so it cannot jump from 2m42s to 40s.
- **Starved** trials, whose data wait exceeded a third of their last epoch
  (``perf/data_wait_frac`` in their last result), are flagged: the GPU (or CPU) waits on the
  input pipeline.

On a terminal the view is redrawn in place every second. In a log (no terminal) a line is
printed only when something changed (a trial started or ended, a phase moved, a best score
improved), at most every ``interval_s``, plus one line a minute while nothing changes; only
the pipelines that changed are printed under the sweep's line, so no block repeats the one
before except for its clock. Tune's own status tables stay a flag away (``--verbose``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.tune import ProgressReporter

from debias.display import format_duration, format_metric

__all__ = ["STARVED_FRACTION", "PipelineView", "SweepProgress", "SweepView", "format_duration",
           "smooth_eta", "sweep_view"]

#: A trial whose data wait exceeds this share of its epoch is flagged as starved.
STARVED_FRACTION = 1 / 3
DATA_WAIT = "perf/data_wait_frac"
STAGE_PHASE = "stage"
#: In a log, a line at least this often while nothing changes (a heartbeat).
HEARTBEAT_S = 60.0


@dataclass(frozen=True)
class PipelineView:
    """One pipeline's line: its phase, that phase's counts, its best search score."""

    name: str
    phase: str  # search | seeds | done
    done: int
    total: int
    running: int
    best: float = math.nan

    def line(self, metric: str, width: int) -> str:
        counts = (f"{self.done}/{self.total} seeds" if self.phase == "done"
                  else f"{self.done}/{self.total} done")
        if self.running:
            counts += f", {self.running} running"
        best = (f"best {metric} {format_metric(metric, self.best)}"
                if math.isfinite(self.best) else f"best {metric} -")
        return f"  {self.name:<{width}} {self.phase:<6} {counts:<22} | {best}"


@dataclass(frozen=True)
class SweepView:
    """What the view shows at one moment; ``key`` is everything but the clocks."""

    sweep: str
    metric: str
    done: int
    total: int
    running: int
    stages: int
    starved: int
    pipelines: tuple[PipelineView, ...]
    #: Seconds of trial work left (summed over trials), NaN while unknown.
    work_left_s: float = math.nan
    #: Epochs reached by running trials, for the heartbeat line.
    epochs: tuple[int, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.done, self.total, self.running, self.stages, self.starved,
                self.pipelines)

    def header(self, elapsed: float, eta: float, finished: bool) -> str:
        parts = [f"sweep {self.sweep!r}: {self.done}/{self.total} trials done"]
        if self.running:
            parts[0] += f", {self.running} running"
        clock = f"{format_duration(elapsed)} elapsed"
        if finished:
            clock = f"finished in {format_duration(elapsed)}"
        elif math.isfinite(eta):
            clock += f", ~{format_duration(eta)} left"
        parts.append(clock)
        if self.stages:
            parts.append(f"{self.stages} shared stage{'s' if self.stages > 1 else ''} "
                         "computing")
        if self.starved:
            parts.append(f"starved: {self.starved} trial{'s' if self.starved > 1 else ''} "
                         f"(data wait > {100 * STARVED_FRACTION:.0f}%)")
        return " | ".join(parts)

    def lines(self, names: Iterable[str] | None = None) -> list[str]:
        """The pipelines' lines (``names``: only those)."""
        width = max((len(p.name) for p in self.pipelines), default=0)
        wanted = None if names is None else set(names)
        return [p.line(self.metric, width) for p in self.pipelines
                if wanted is None or p.name in wanted]


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _better(a: float, b: float, mode: str) -> bool:
    return math.isnan(b) or (a > b if mode == "max" else a < b)


def sweep_view(sweep: str, metric: str, mode: str, trials: Iterable[Any],
               pipes: Mapping[str, Any]) -> SweepView:
    """The view of a sweep from Tune's trials (status, config, last result) and the
    searcher's pipelines (``SweepSearcher.pipes``: what each phase holds and still draws)."""
    running_by: dict[str, int] = {}
    durations: dict[str, list[float]] = {}
    running_elapsed: dict[str, list[float]] = {}
    stages = starved = 0
    epochs = []
    for t in trials:
        config = t.config or {}
        result = t.last_result or {}
        phase, name = config.get("phase"), config.get("pipeline")
        if t.status == "RUNNING":
            if phase == STAGE_PHASE:
                stages += 1
                continue
            running_by[name] = running_by.get(name, 0) + 1
            running_elapsed.setdefault(name, []).append(_number(result.get("time_total_s", 0)))
            if _number(result.get(DATA_WAIT)) > STARVED_FRACTION:
                starved += 1
            if isinstance(result.get("epoch"), int | float):
                epochs.append(int(result["epoch"]))
        elif t.status == "TERMINATED" and phase != STAGE_PHASE:
            spent = _number(result.get("time_total_s"))
            if math.isfinite(spent) and spent > 0:
                durations.setdefault(name, []).append(spent)
    views = []
    total = done = 0
    every = [d for ds in durations.values() for d in ds]
    overall = sum(every) / len(every) if every else math.nan
    work = 0.0
    for name, pipe in pipes.items():
        records = pipe.trials.values()
        search = [r for r in records if r.phase == "search"]
        seeds = [r for r in records if r.phase != "search"]
        n_search, n_seeds = pipe.total_search(), len(pipe.plan.seeds)
        pipe_done = sum(r.done for r in records)
        finished = pipe.finished()
        if finished:
            phase, shown_done, shown_total = "done", sum(r.done for r in seeds), n_seeds
        elif pipe.seeds_released:
            phase, shown_done, shown_total = "seeds", sum(r.done for r in seeds), n_seeds
        else:
            phase, shown_done, shown_total = "search", sum(r.done for r in search), n_search
        best = math.nan
        for r in search:
            if r.done and r.ok and _better(r.score, best, mode):
                best = r.score
        running = running_by.get(name, 0)
        views.append(PipelineView(name, phase, shown_done, shown_total, running, best))
        pipe_total = n_search + n_seeds
        total += pipe_total
        done += pipe_done
        mean = durations.get(name)
        per_trial = sum(mean) / len(mean) if mean else overall
        waiting = max(0, pipe_total - pipe_done - running)
        left_running = sum(max(0.0, per_trial - e) for e in running_elapsed.get(name, [])
                           if math.isfinite(e))
        work += waiting * per_trial + left_running
    return SweepView(sweep, metric, done, total, sum(running_by.values()), stages, starved,
                     tuple(views), work if math.isfinite(work) else math.nan, tuple(epochs))


def smooth_eta(raw: float, previous: float | None, dt: float) -> float:
    """The estimate to show: ``raw`` held within ``dt`` of where the previous estimate would
    be now (``previous - dt``), so it never jumps by more than the time that passed."""
    if previous is None or not math.isfinite(previous):
        return raw
    if not math.isfinite(raw):
        return max(0.0, previous - dt)
    expected = previous - dt
    return max(0.0, min(max(raw, expected - dt), expected + dt))


class SweepProgress(ProgressReporter):
    """Tune's progress hook: reads the sweep's searcher for what each phase holds."""

    def __init__(self, sweep: str, metric: str, mode: str, interval_s: float = 30.0,
                 label: str | None = None, tty: bool | None = None) -> None:
        self.sweep, self.metric, self.mode = sweep, metric, mode
        #: The selection metric as the person named it (``val/worst_group_acc``).
        self.label = label or metric
        self.interval_s = interval_s
        self._tty = tty
        self._start = time.time()
        self._reset()

    def _reset(self) -> None:
        self._last_print = 0.0
        self._last_key: tuple[Any, ...] | None = None
        self._last_lines: dict[str, str] = {}
        self._lines_drawn = 0
        self._eta: float | None = None
        self._eta_at = 0.0
        self._slots = 1
        self._epochs: tuple[int, ...] = ()

    @property
    def tty(self) -> bool:
        return sys.stdout.isatty() if self._tty is None else self._tty

    def setup(self, start_time: float | None = None, total_samples: int | None = None,
              metric: str | None = None, mode: str | None = None, **kwargs: Any) -> None:
        self._start = start_time or time.time()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_last_key=None, _last_lines={}, _lines_drawn=0, _eta=None)
        return state

    # ------------------------------------------------------------------ Tune's hooks

    def should_report(self, trials: list, done: bool = False) -> bool:
        if done:
            return True
        since = time.time() - self._last_print
        if self.tty:
            return since >= 1.0
        if since >= HEARTBEAT_S:
            return True
        return since >= self.interval_s and self._view(trials).key != self._last_key

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        text = self.render(trials, done)
        if text:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    # ------------------------------------------------------------------ the view

    def _view(self, trials: list) -> SweepView:
        from debias.search import SweepSearcher

        searcher = SweepSearcher.live.get(self.sweep)
        pipes = searcher.pipes if searcher is not None else {}
        return sweep_view(self.sweep, self.label, self.mode, trials, pipes)

    def _estimate(self, view: SweepView, now: float) -> float:
        self._slots = max(self._slots, view.running + view.stages)
        raw = 0.0 if view.done >= view.total and view.total else view.work_left_s / self._slots
        shown = smooth_eta(raw, self._eta, now - self._eta_at)
        if math.isfinite(shown):
            self._eta, self._eta_at = shown, now
        return shown

    def render(self, trials: list, done: bool = False) -> str:
        """The text to print now ("" when a log has nothing new)."""
        now = time.time()
        view = self._view(trials)
        eta = self._estimate(view, now)
        finished = done and view.total > 0 and view.done >= view.total
        header = view.header(now - self._start, eta, finished)
        changed = view.key != self._last_key
        if self.tty:
            bar_width = 24
            filled = int(bar_width * view.done / view.total) if view.total else 0
            lines = [f"[{'#' * filled}{'.' * (bar_width - filled)}] {header}", *view.lines()]
            text = "\n".join(lines)
            if self._lines_drawn:  # redraw in place
                text = f"\x1b[{self._lines_drawn}F\x1b[J" + text
            self._lines_drawn = len(lines)
        else:
            current = dict(zip((p.name for p in view.pipelines), view.lines(), strict=True))
            moved = [line for name, line in current.items()
                     if self._last_lines.get(name) != line]
            if not changed and not done:
                if view.epochs == self._epochs and now - self._last_print < HEARTBEAT_S:
                    return ""
                # Nothing moved between phases: say where the running trials are.
                if view.epochs:
                    header += f" | running trials at epoch {', '.join(map(str, view.epochs))}"
            self._last_lines = current
            text = "\n".join([header, *moved])
        self._epochs = view.epochs
        self._last_key = view.key
        self._last_print = now
        return text
