"""The result table, read back from MLflow (the record of truth), never from in-memory state:
`--report` on a finished or half-finished sweep prints the same table the sweep printed when
it ended, and `--compare` builds it from several sweeps' experiments.

One row per (target, method): the seeds phase's test worst-group accuracy (WGA) and average
accuracy as a mean with a 95% confidence interval over seeds (Student t), the paired
difference in WGA against ERM on the same target and seeds (with its own 95% interval), and
which bias labels the method read for training and which the selection rule read.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from scipy.stats import t as student_t

from debias.display import format_config
from debias.sections import LABEL_FREE_METRICS
from debias.tracking import BEST_SCORE, Tracker, best_of_params

__all__ = ["AmbiguousReference", "Row", "Stat", "collect", "pair", "paired_difference",
           "render_markdown", "render_text", "write_report"]

REFERENCE_METHOD = "erm"


@dataclass(frozen=True)
class Stat:
    """Mean of per-seed values with the half-width of its 95% Student-t interval."""

    mean: float
    std: float
    ci95: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = [float(v) for v in values if not math.isnan(float(v))]
        if not values:
            return cls(math.nan, math.nan, math.nan, 0)
        if len(values) == 1:
            return cls(values[0], 0.0, math.nan, 1)
        std = statistics.stdev(values)
        half = float(student_t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))
        return cls(statistics.fmean(values), std, half, len(values))

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{100 * self.mean:.1f} (1 seed)"
        return f"{100 * self.mean:.1f} ± {100 * self.ci95:.1f}"


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> Stat:
    """method - reference over the seeds both have (a paired comparison: the seed's data
    order, initialisation and stages are shared, so their noise cancels)."""
    seeds = sorted(set(values) & set(reference))
    return Stat.of([values[s] - reference[s] for s in seeds])


@dataclass(frozen=True)
class Row:
    target: str
    bias: str
    method: str
    status: str
    sweep: str = ""
    best_params: dict[str, str] = field(default_factory=dict)
    val_score: float = math.nan
    seeds: tuple[int, ...] = ()
    wga_by_seed: dict[int, float] = field(default_factory=dict)
    test_wga: Stat = field(default_factory=lambda: Stat.of([]))
    test_avg: Stat = field(default_factory=lambda: Stat.of([]))
    delta_wga: Stat = field(default_factory=lambda: Stat.of([]))
    bias_labels: str = "?"
    selection: str = "?"
    parent_id: str = ""
    dataset_config: str = ""
    #: What one trial selects among (epochs, grid points), from the parent's tag.
    selects_among: str = ""
    #: The sweep's own ERM row this row was paired with, for --compare ("" within a sweep).
    paired_with: str = ""

    @property
    def selection_reads_bias(self) -> bool:
        return self.selection not in LABEL_FREE_METRICS


def _rows_of(tracker: Tracker) -> list[Row]:
    rows = []
    for name, parent in sorted(tracker.parent_runs().items()):
        tags, params = parent.data.tags, parent.data.params
        runs = [r for r in tracker.child_runs(parent.info.run_id, "seeds")
                if r.info.status == "FINISHED"]
        runs.sort(key=lambda r: int(r.data.tags.get("seed", 0)))
        wga = {int(r.data.tags["seed"]): r.data.metrics["test/worst_group_acc"] for r in runs
               if "test/worst_group_acc" in r.data.metrics}
        avg = [r.data.metrics["test/avg_acc"] for r in runs if "test/avg_acc" in r.data.metrics]
        best = best_of_params(params)
        rows.append(Row(
            target=tags.get("target_attribute", name), bias=tags.get("bias_attribute", "?"),
            method=tags.get("method", "?"), status=parent.info.status,
            sweep=tracker.experiment, best_params=best,
            val_score=float(params.get(BEST_SCORE, "nan")),
            seeds=tuple(sorted(wga)), wga_by_seed=wga,
            test_wga=Stat.of(list(wga.values())), test_avg=Stat.of(avg),
            bias_labels=tags.get("bias_labels", "?"),
            selection=tags.get("selection_metric", "?"), parent_id=parent.info.run_id,
            dataset_config=tags.get("dataset_config", ""),
            selects_among=tags.get("trial_selects_among", "")))
    return rows


class AmbiguousReference(ValueError):
    """``--compare`` cannot tell which ERM row a method's row is to be paired with."""


def _reference_for(row: Row, rows: Sequence[Row]) -> Row | None:
    """The ERM row a row is paired with: the same sweep's, for the same target and bias;
    else, across the compared sweeps, the one with the same dataset configuration, target
    and bias. Several candidates are refused, naming them (never a silent pick)."""
    erm = [r for r in rows if r.method == REFERENCE_METHOD and r.target == row.target
           and r.bias == row.bias]
    same_sweep = [r for r in erm if r.sweep == row.sweep]
    if same_sweep:
        return same_sweep[0]
    candidates = [r for r in erm if r.dataset_config and r.dataset_config == row.dataset_config]
    if len(candidates) > 1:
        raise AmbiguousReference(
            f"{row.sweep}: {row.method} on {row.target} can be paired with the ERM rows of "
            f"{', '.join(sorted(r.sweep for r in candidates))} (same dataset configuration, "
            "target and bias); compare it with one of them only")
    return candidates[0] if candidates else None


def collect(trackers: Tracker | Iterable[Tracker]) -> list[Row]:
    """Rows of one sweep, or of several (``--compare``), with each method's paired WGA
    difference against its ERM row (see :func:`_reference_for`); raises
    :class:`AmbiguousReference` when that row is not unique."""
    if isinstance(trackers, Tracker):
        trackers = [trackers]
    return pair([row for tracker in trackers for row in _rows_of(tracker)])


def pair(rows: Sequence[Row]) -> list[Row]:
    """Each row with its paired WGA difference against its ERM row, in table order."""
    out = []
    for r in rows:
        ref = _reference_for(r, rows)
        delta = (paired_difference(r.wga_by_seed, ref.wga_by_seed)
                 if ref is not None and r is not ref else Stat.of([]))
        paired = ref.sweep if ref is not None and ref.sweep != r.sweep else ""
        out.append(Row(**{**r.__dict__, "delta_wga": delta, "paired_with": paired}))
    order = {m: i for i, m in enumerate(_method_order(out))}
    out.sort(key=lambda r: (r.target, order[r.method], r.sweep))
    return out


def _method_order(rows: Sequence[Row]) -> list[str]:
    from debias.methods import BUILTIN

    names = list(BUILTIN)
    return names + sorted({r.method for r in rows} - set(names))


HEADER = ("target", "bias", "method", "seeds", "val selection", "test WGA % (95% CI)",
          "test avg acc % (95% CI)", "Δ WGA vs ERM (95% CI)", "bias labels: train / select",
          "best config")


def _delta(stat: Stat, paired_with: str = "") -> str:
    if stat.n == 0:
        return "—"
    if paired_with:
        return f"{_delta(stat)} (vs {paired_with})"
    sign = "+" if stat.mean >= 0 else "−"
    if stat.n == 1:
        return f"{sign}{100 * abs(stat.mean):.1f} (1 seed)"
    return f"{sign}{100 * abs(stat.mean):.1f} ± {100 * stat.ci95:.1f}"


def _cells(row: Row) -> tuple[str, ...]:
    config = format_config(row.best_params) or "(file values)"
    score = "n/a" if math.isnan(row.val_score) else f"{100 * row.val_score:.1f}"
    select = f"val ({row.selection})" if row.selection_reads_bias else f"none ({row.selection})"
    return (row.target, row.bias, row.method, str(row.test_wga.n), score, str(row.test_wga),
            str(row.test_avg), _delta(row.delta_wga, row.paired_with),
            f"{row.bias_labels} / {select}", config)


def render_text(rows: list[Row]) -> str:
    table = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[Row], notes: Sequence[str] = ()) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


CSV_HEADER = ("sweep", "target", "bias", "method", "n_seeds", "seeds", "val_selection",
              "test_wga_mean", "test_wga_std", "test_wga_ci95", "test_avg_mean", "test_avg_std",
              "test_avg_ci95", "delta_wga_vs_erm_mean", "delta_wga_vs_erm_ci95",
              "delta_wga_vs_erm_n", "bias_labels_train", "selection_metric",
              "selection_reads_bias_labels", "best_config")


def write_report(rows: list[Row], folder: Path, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, csv_path = folder / "report.md", folder / "report.csv"
    md.write_text(render_markdown(rows, notes))
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        for r in rows:
            writer.writerow([r.sweep, r.target, r.bias, r.method, r.test_wga.n,
                             " ".join(map(str, r.seeds)), r.val_score,
                             r.test_wga.mean, r.test_wga.std, r.test_wga.ci95,
                             r.test_avg.mean, r.test_avg.std, r.test_avg.ci95,
                             r.delta_wga.mean, r.delta_wga.ci95, r.delta_wga.n,
                             r.bias_labels, r.selection, r.selection_reads_bias,
                             "; ".join(f"{k}={v}" for k, v in sorted(r.best_params.items()))])
    return md, csv_path


def row_metrics(row: Row) -> dict[str, float]:
    """A row's numbers as ``report/*`` metrics for its parent run (compare methods in the
    MLflow runs table without opening a run)."""
    out = {"report/test_wga_mean": row.test_wga.mean, "report/test_wga_ci95": row.test_wga.ci95,
           "report/test_avg_mean": row.test_avg.mean, "report/test_avg_ci95": row.test_avg.ci95,
           "report/n_seeds": float(row.test_wga.n)}
    if row.delta_wga.n:
        out["report/delta_wga_vs_erm"] = row.delta_wga.mean
        out["report/delta_wga_vs_erm_ci95"] = row.delta_wga.ci95
    return {k: v for k, v in out.items() if not math.isnan(v)}


# --------------------------------------------------------------------------- starved trials
# (issue 20, input pipeline) A trial whose device waited for batches more than a third of its
# training time measured the input pipeline, not the method: the report says so, naming them.

STARVED_WAIT_FRAC = 1.0 / 3.0
DATA_WAIT_METRIC = "perf/data_wait_frac"


def starved_notes(tracker: Tracker, threshold: float = STARVED_WAIT_FRAC) -> list[str]:
    """A note naming the trials whose last epoch waited for data more than ``threshold`` of
    its training time (``perf/data_wait_frac``), with what to do; none when no trial did."""
    starved = []
    for pipeline, parent in sorted(tracker.parent_runs().items()):
        for run in tracker.child_runs(parent.info.run_id):
            wait = run.data.metrics.get(DATA_WAIT_METRIC)
            if wait is not None and wait > threshold:
                starved.append(f"{pipeline} {run.info.run_name} ({wait:.0%})")
    if not starved:
        return []
    shown = ", ".join(starved[:8]) + (f" and {len(starved) - 8} more" if len(starved) > 8
                                      else "")
    return [f"starved: {len(starved)} trial(s) waited for their next batch more than a third "
            f"of their training time ({DATA_WAIT_METRIC}): {shown}; their device idled on the "
            "input pipeline: give trials more CPUs (resources.cpu, train.num_workers), keep "
            "cache.decoded on (local on a network file system), or a smaller image size"]
