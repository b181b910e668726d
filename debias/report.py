"""The per-target result table, read back from MLflow (the record of truth), never from
in-memory state: `--report` on a finished or half-finished sweep prints the same table the
sweep printed when it ended."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from debias.tracking import Tracker

__all__ = ["TargetRow", "collect", "render_markdown", "render_text", "write_report"]


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    sem: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        if not values:
            return cls(math.nan, math.nan, math.nan, 0)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, std / math.sqrt(len(values)), len(values))

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        return f"{100 * self.mean:.1f} ± {100 * self.std:.1f} (se {100 * self.sem:.1f})"


@dataclass(frozen=True)
class TargetRow:
    target: str
    bias: str
    method: str
    status: str
    best_params: dict[str, str] = field(default_factory=dict)
    val_score: float = math.nan
    seeds: tuple[int, ...] = ()
    test_wga: Stat = field(default_factory=lambda: Stat.of([]))
    test_avg: Stat = field(default_factory=lambda: Stat.of([]))


def collect(tracker: Tracker) -> list[TargetRow]:
    rows = []
    for target, parent in sorted(tracker.parent_runs().items()):
        tags, params = parent.data.tags, parent.data.params
        runs = [r for r in tracker.child_runs(parent.info.run_id, "seeds")
                if r.info.status == "FINISHED"]
        runs.sort(key=lambda r: int(r.data.tags.get("seed", 0)))
        wga = [r.data.metrics["test/worst_group_acc"] for r in runs
               if "test/worst_group_acc" in r.data.metrics]
        avg = [r.data.metrics["test/avg_acc"] for r in runs if "test/avg_acc" in r.data.metrics]
        best = {k[len("best."):]: v for k, v in params.items()
                if k.startswith("best.") and k != "best.score"}
        rows.append(TargetRow(
            target=target, bias=tags.get("bias_attribute", "?"), method=tags.get("method", "?"),
            status=parent.info.status, best_params=best,
            val_score=float(params.get("best.score", "nan")),
            seeds=tuple(int(r.data.tags.get("seed", -1)) for r in runs),
            test_wga=Stat.of(wga), test_avg=Stat.of(avg)))
    return rows


HEADER = ("target", "bias", "method", "seeds", "val selection", "test WGA % (mean ± std)",
          "test avg acc %", "best config")


def _cells(row: TargetRow) -> tuple[str, ...]:
    config = ", ".join(f"{k}={v}" for k, v in sorted(row.best_params.items())) or "(file values)"
    score = "n/a" if math.isnan(row.val_score) else f"{100 * row.val_score:.1f}"
    return (row.target, row.bias, row.method, str(row.test_wga.n), score, str(row.test_wga),
            str(row.test_avg), config)


def render_text(rows: list[TargetRow]) -> str:
    table = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[TargetRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(rows: list[TargetRow], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, csv_path = folder / "report.md", folder / "report.csv"
    md.write_text(render_markdown(rows))
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["target", "bias", "method", "n_seeds", "seeds", "val_selection",
                         "test_wga_mean", "test_wga_std", "test_wga_sem", "test_avg_mean",
                         "test_avg_std", "test_avg_sem", "best_config"])
        for r in rows:
            writer.writerow([r.target, r.bias, r.method, r.test_wga.n,
                             " ".join(map(str, r.seeds)), r.val_score,
                             r.test_wga.mean, r.test_wga.std, r.test_wga.sem,
                             r.test_avg.mean, r.test_avg.std, r.test_avg.sem,
                             "; ".join(f"{k}={v}" for k, v in sorted(r.best_params.items()))])
    return md, csv_path
