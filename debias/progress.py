"""What a person sees while a sweep runs: one compact view of every pipeline.

Per pipeline: its phase, trials done / running / still to come, the best selection score so
far; for the sweep: elapsed time and an estimate of what remains (mean trial time x trials
left / trials running). Where a terminal is attached the view is redrawn in place (a progress
bar); in a log it is a few plain lines, printed when something changed and at most every
``interval_s``. Tune's own status tables stay a flag away (``--verbose``).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ray.tune import ProgressReporter

__all__ = ["SweepProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class SweepProgress(ProgressReporter):
    """Tune's progress hook, reading the sweep's searcher for what is still to come."""

    def __init__(self, sweep: str, metric: str, mode: str, interval_s: float = 10.0) -> None:
        self.sweep, self.metric, self.mode = sweep, metric, mode
        self.interval_s = interval_s
        self._start = time.time()
        self._last_print = 0.0
        self._last_text = ""
        self._lines_drawn = 0

    def setup(self, start_time: float | None = None, total_samples: int | None = None,
              metric: str | None = None, mode: str | None = None, **kwargs: Any) -> None:
        self._start = start_time or time.time()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lines_drawn": 0, "_last_text": ""}

    def should_report(self, trials: list, done: bool = False) -> bool:
        tty = sys.stdout.isatty()
        due = time.time() - self._last_print >= (1.0 if tty else self.interval_s)
        return done or due

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        text = self.render(trials, done)
        if text == self._last_text and not done:
            return
        self._last_print = time.time()
        self._last_text = text
        if sys.stdout.isatty():
            if self._lines_drawn:
                sys.stdout.write(f"\x1b[{self._lines_drawn}F\x1b[J")  # redraw in place
            self._lines_drawn = text.count("\n") + 1
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def render(self, trials: list, done: bool = False) -> str:
        from debias.search import SweepSearcher

        searcher = SweepSearcher.live.get(self.sweep)
        progress = searcher.progress() if searcher else {}
        best: dict[str, float] = {}
        durations = []
        stages = 0
        for t in trials:
            result = t.last_result or {}
            name = (t.config or {}).get("pipeline")
            score = result.get(self.metric)
            counts = (name and t.status == "TERMINATED" and isinstance(score, float)
                      and not math.isnan(score) and (t.config or {}).get("phase") == "search")
            if counts and (name not in best or (score > best[name]) == (self.mode == "max")):
                best[name] = score
            if (t.config or {}).get("phase") == "stage":
                stages += t.status == "RUNNING"
                continue
            if t.status == "TERMINATED" and result.get("time_total_s"):
                durations.append(float(result["time_total_s"]))
        elapsed = time.time() - self._start
        total = {k: sum(p[k] for p in progress.values()) for k in ("done", "running", "pending")}
        all_trials = sum(total.values())
        left = total["running"] + total["pending"]
        mean = sum(durations) / len(durations) if durations else math.nan
        eta = mean * left / max(1, total["running"]) if left else 0.0
        width = 24
        filled = int(width * total["done"] / all_trials) if all_trials else 0
        bar = "#" * filled + "." * (width - filled)
        lines = [f"[{bar}] sweep {self.sweep!r}: {total['done']}/{all_trials} trials done, "
                 f"{total['running']} running | {format_duration(elapsed)} elapsed, "
                 f"~{format_duration(eta)} left" + (f" | {stages} shared stage(s) computing"
                                                    if stages else "")
                 + (" | done" if done and not left else "")]
        for name, p in progress.items():
            score = f"best {100 * best[name]:.1f}" if name in best else "best -"
            lines.append(f"  {name:<28} {p['phase']:<6} {p['done']:>3} done {p['running']:>2} "
                         f"running {p['pending']:>3} to come | {score}")
        return "\n".join(lines)
