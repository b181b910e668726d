"""Figures of a sweep, drawn from MLflow (the record of truth) like the report table.

The table says which config won and by how much; these figures say why one can trust it:
whether the seed spread is small next to the gaps between methods (test WGA), whether the
search found a plateau or a lucky spike (metric against each hyperparameter), which group the
worst-group number comes from (per-group accuracy); a method adds its own (ClusterFix:
whether its clusters found the bias attribute at all, drawn in its module with the helpers
here).

Each figure explains itself without the README: one colour per method everywhere (the same
method has the same colour in every figure of a sweep) and a legend, axis labels with units,
accuracies in percent as in the report table, log axes for keys the search sampled on a log
scale, and a caption saying what bars, error bars (95% Student-t intervals, as in the table)
and dots are. No figure has an empty panel.

Each ``plot_*`` function takes plain data, so it is testable without MLflow, writes one PNG
and returns its :class:`~matplotlib.figure.Figure`. The figures are built on the Agg canvas
directly, never through ``pyplot``: no display is needed, no global figure list grows in a
long-running driver, and the caller's own matplotlib backend is left alone. Every PNG also
carries the numbers it shows as JSON in its ``Description`` text chunk, so a file can be
checked (or re-plotted) without the store it came from.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import textwrap
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter

from debias.tracking import Tracker, best_of_params

__all__ = [
    "CI_CAPTION",
    "SELECTION_METRIC",
    "SWEEP_FIGURES",
    "TargetRuns",
    "caption",
    "draw_sweep",
    "load_target_runs",
    "method_colors",
    "new_figure",
    "plot_group_accuracy",
    "plot_metric_vs_params",
    "plot_test_wga",
    "read_png_data",
    "safe_name",
    "save_figure",
    "set_title",
    "sweep_plots",
]

#: The figures of the whole sweep; every other stem is one pipeline's, ending in
#: ``_<pipeline>`` (:func:`safe_name` of its parent run's name).
SWEEP_FIGURES = ("test_wga", "metric_vs_params")
#: What every trial logs as the value its search metric took at the selected epoch.
SELECTION_METRIC = "selected/score"
TEST_WGA = "test/worst_group_acc"
GROUP_ACC_PREFIX = "test/group_acc/"
PNG_DATA_KEY = "Description"
#: Without the search space at hand (``--compare``), a numeric hyperparameter whose values
#: span more than this ratio gets a log axis.
LOG_SPAN = 100.0
DPI = 100
CI_CAPTION = ("error bars: 95% confidence interval of the mean over seeds (Student t), as in "
              "the table")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


# ---------------------------------------------------------------------------- small helpers


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (see the module docstring for why not pyplot)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path | str, drawn: Any) -> Path:
    """Write the PNG with what it draws embedded, so the file alone can be verified."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI,
                metadata={PNG_DATA_KEY: json.dumps(drawn, allow_nan=True)})
    return path


def read_png_data(path: Path | str) -> Any:
    """The numbers a PNG written here shows (its embedded JSON)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return json.loads(image.info[PNG_DATA_KEY])


def _finite(values: Iterable[float]) -> list[float]:
    """MLflow never stores NaN here, but callers' plain data may hold it: leave it out."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _spread(values: Sequence[float]) -> float:
    """Sample std (as in the report table); zero for a single seed rather than undefined."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def set_title(ax: Axes, text: str) -> None:
    """Wrap a long title to the axes' width, so a long target name is not cut off."""
    width_in = ax.get_figure().get_figwidth()
    ax.set_title(textwrap.fill(text, width=max(20, int(width_in * 9))), fontsize="medium")


def _as_percent(ax: Axes, full: bool = True) -> None:
    """Accuracies are stored as fractions and read as percentages, as in the report."""
    if full:
        ax.set_ylim(0.0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0) if full else
                                 FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))


def _log_x(ax: Axes) -> None:
    """A log x axis labelled in plain numbers (0.02, 0.05, 0.1), not as powers of ten."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _is_accuracy(metric: str) -> bool:
    return "acc" in metric.rsplit("/", 1)[-1]


def caption(fig: Figure, text: str) -> None:
    """What the marks mean, under the figure (laid out with it, so never cut off)."""
    fig.supxlabel(textwrap.fill(text, width=max(40, int(fig.get_figwidth() * 13))),
                  fontsize="small", color="0.3")


def method_colors(methods: Iterable[str]) -> dict[str, str]:
    """One colour per method, the same in every figure: built-in methods in the report's
    order take fixed colours, others the next free ones."""
    from debias.methods import BUILTIN

    names = list(BUILTIN) + sorted({m for m in methods if m is not None} - set(BUILTIN))
    return {m: f"C{i % 10}" for i, m in enumerate(names)}


def _ordered_methods(methods: Iterable[str]) -> list[str]:
    unique = set(methods)
    order = list(method_colors(unique))
    return sorted(unique, key=order.index)


def _as_numbers(values: Sequence[Any]) -> list[float] | None:
    """The values as floats, or None when any is not a number (then the axis is categorical).

    MLflow params come back as strings, so "1e-3" is a number here; booleans and words
    ("adam", "True") are categories."""
    out = []
    for value in values:
        if isinstance(value, bool):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(number):
            return None
        out.append(number)
    return out


def safe_name(text: str) -> str:
    """A target name as a file-name part (attribute names are plain, but be sure)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "_"


# ---------------------------------------------------------------------------- 1. test WGA


def _ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean (the report's); 0 for one seed."""
    from debias.report import Stat

    half = Stat.of(values).ci95
    return 0.0 if math.isnan(half) else half


def plot_test_wga(runs_by_target_method: Mapping[tuple[str, str], Sequence[float]],
                  path: Path | str) -> Figure:
    """Test worst-group accuracy per target and method: a bar at the seeds' mean, error bar
    its 95% confidence interval (Student t, as in the report table), a dot per seed, so a gap
    between methods can be judged against seed noise.

    ``runs_by_target_method`` maps (target, method) to one value per seed. Each bar's gid is
    ``"<target>|<method>"``; methods keep their colour (:func:`method_colors`)."""
    data = {key: _finite(values) for key, values in runs_by_target_method.items()}
    data = {key: values for key, values in data.items() if values}
    targets = sorted({target for target, _ in data})
    methods = _ordered_methods(method for _, method in data)
    colors = method_colors(methods)
    fig = new_figure(max(5.5, 3.0 + (0.6 + 0.5 * len(methods)) * len(targets)), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    drawn = []
    for i, method in enumerate(methods):
        offset = (i - (len(methods) - 1) / 2) * width
        present = [t for t in targets if (t, method) in data]
        xs = [targets.index(t) + offset for t in present]
        means = [statistics.fmean(data[t, method]) for t in present]
        stds = [_spread(data[t, method]) for t in present]
        cis = [_ci95(data[t, method]) for t in present]
        bars = ax.bar(xs, means, width * 0.9, yerr=cis, capsize=3, color=colors[method],
                      alpha=0.75, label=method)
        for bar, target in zip(bars, present, strict=True):
            bar.set_gid(f"{target}|{method}")
        for x, target in zip(xs, present, strict=True):
            seeds = data[target, method]
            ax.scatter([x] * len(seeds), seeds, s=14, color="black", zorder=3)
        drawn += [{"target": t, "method": method, "mean": m, "std": s, "ci95": c,
                   "values": data[t, method]}
                  for t, m, s, c in zip(present, means, stds, cis, strict=True)]
    ax.set_xticks(range(len(targets)), targets)
    ax.set_xlabel("target attribute")
    ax.set_ylabel("test worst-group accuracy (%)")
    set_title(ax, "Test worst-group accuracy of each method's best config")
    _as_percent(ax)
    if methods:
        fig.legend(title="method", loc="outside right upper")
    seeds = sorted({len(v) for v in data.values()})
    caption(fig, f"bars: mean over {'/'.join(map(str, seeds)) or 0} seed(s); dots: each seed; "
                  + CI_CAPTION)
    save_figure(fig, path, drawn)
    return fig


# ---------------------------------------------------------------------------- 2. search


def _series(trials: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(method, target) pairs in a stable order: methods as in the report, then targets."""
    methods = _ordered_methods({t.get("method", "?") for t in trials})
    targets = sorted({t["target"] for t in trials})
    present = {(t.get("method", "?"), t["target"]) for t in trials}
    return [(m, g) for m in methods for g in targets if (m, g) in present]


def _plot_param(ax: Axes, trials: Sequence[Mapping[str, Any]], param: str,
                series: Sequence[tuple[str, str]], colors: Mapping[str, str],
                markers: Mapping[str, str], log: bool | None) -> list[dict[str, Any]]:
    """One hyperparameter's panel: a marker series per (method, target) that has it,
    categorical or numeric; ``log`` None: decide from the values' span."""
    having = [t for t in trials if param in t["params"]]
    raw = [t["params"][param] for t in having]
    numbers = _as_numbers(raw)
    categories = sorted({str(v) for v in raw}) if numbers is None else []
    position = dict(zip(raw, numbers, strict=True)) if numbers is not None else {}
    drawn = []
    mine_series = [(m, g) for m, g in series
                   if any(t.get("method", "?") == m and t["target"] == g for t in having)]
    for i, (method, target) in enumerate(mine_series):
        mine = [t for t in having if t.get("method", "?") == method and t["target"] == target]
        if numbers is None:
            # A small per-series shift keeps series' markers on one category apart.
            shift = (i - (len(mine_series) - 1) / 2) * 0.08
            xs = [categories.index(str(t["params"][param])) + shift for t in mine]
        else:
            xs = [position[t["params"][param]] for t in mine]
        ys = [float(t["metric"]) for t in mine]
        ax.plot(xs, ys, marker=markers[target], linestyle="none", alpha=0.85,
                color=colors[method], label=f"{method} / {target}", markeredgecolor="black",
                markeredgewidth=0.4)
        drawn.append({"method": method, "target": target, "x": xs, "y": ys})
    if numbers is None:
        ax.set_xticks(range(len(categories)), categories)
    elif log or (log is None and numbers and min(numbers) > 0
                 and max(numbers) / min(numbers) > LOG_SPAN):
        _log_x(ax)
    ax.set_xlabel(param + (" (log scale)" if ax.get_xscale() == "log" else ""))
    return drawn


def _panel_grid(fig: Figure, n: int) -> list[Axes]:
    """``n`` panels, at most 3 a row, the last row centred: no empty panel is left."""
    ncols = min(3, max(1, n))
    nrows = max(1, math.ceil(n / ncols))
    grid = fig.add_gridspec(nrows, 2 * ncols)
    axes = []
    for i in range(n):
        row, col = divmod(i, ncols)
        in_row = min(ncols, n - row * ncols)
        start = (ncols - in_row) + 2 * col  # half-cell offsets centre a short last row
        axes.append(fig.add_subplot(grid[row, start:start + 2]))
    return axes


def plot_metric_vs_params(trials: Sequence[Mapping[str, Any]], searched_params: Sequence[str],
                          metric: str, path: Path | str,
                          log_params: Collection[str] | None = None) -> Figure:
    """The selection metric of every search trial against each searched hyperparameter, one
    panel per hyperparameter, one colour per method (a marker per target): shows whether the
    chosen value sits on a plateau or is one lucky trial, and which knobs matter at all.

    ``trials``: dicts ``{"method", "target", "params": {name: value}, "metric": float}``;
    trials whose metric is not finite are left out, and so is a hyperparameter no trial has.
    ``log_params``: the keys the search sampled on a log scale (log x axes); None decides from
    the values (more than two decades: log). Anything non-numeric is shown as categories."""
    trials = [t for t in trials if _finite([t["metric"]])]
    # Keys every method searches (train.*, backbone.*) first, then each method's own.
    params = sorted((p for p in searched_params if any(p in t["params"] for t in trials)),
                    key=lambda p: (p.partition(".")[0] not in ("train", "backbone"), p))
    series = _series(trials)
    colors = method_colors(m for m, _ in series)
    targets = sorted({g for _, g in series})
    markers = {g: MARKERS[i % len(MARKERS)] for i, g in enumerate(targets)}
    ncols = min(3, max(1, len(params)))
    nrows = max(1, math.ceil(len(params) / ncols))
    fig = new_figure(4.2 * ncols + 1.6, 3.4 * nrows + 0.9)
    axes = _panel_grid(fig, len(params))
    drawn: dict[str, Any] = {"metric": metric, "params": {}}
    percent = _is_accuracy(metric)
    for ax, param in zip(axes, params, strict=True):
        log = None if log_params is None else param in log_params
        drawn["params"][param] = _plot_param(ax, trials, param, series, colors, markers, log)
        ax.set_ylabel(f"{metric} (%)" if percent else metric)
        if percent:
            _as_percent(ax, full=False)
    methods = _ordered_methods(m for m, _ in series)
    if methods and params:
        handles = [Line2D([], [], color=colors[m], marker="o", linestyle="none", label=m)
                   for m in methods]
        if len(targets) > 1:
            handles += [Line2D([], [], color="0.4", marker=markers[g], linestyle="none",
                               label=f"target {g}") for g in targets]
        fig.legend(handles=handles, title="method", loc="outside right upper")
    fig.suptitle(f"Search: {metric} (validation, the selection metric) per searched "
                 "hyperparameter")
    caption(fig, "each point: one search trial (search seed), at the epoch its selection "
                  "metric chose; a panel shows only the methods that search its key")
    save_figure(fig, path, drawn)
    return fig


# ---------------------------------------------------------------------------- 3. groups


def _group_label(group: Any, target: str = "y", bias: str = "a") -> str:
    if isinstance(group, tuple) and len(group) == 2:
        return f"{target}={group[0]}, {bias}={group[1]}"
    return str(group)


def plot_group_accuracy(group_acc: Mapping[Any, Sequence[float]], path: Path | str,
                        title: str, target: str = "y", bias: str = "a",
                        method: str | None = None) -> Figure:
    """Per-group test accuracy of the best config (mean over seeds, error bar its 95%
    interval as in the table, a dot per seed), the worst group highlighted: shows which
    (target, bias) combination the WGA comes from and how far it trails the others.

    ``group_acc`` maps a group ``(y, a)`` (target value, bias value) to one accuracy per seed;
    bars are ordered by group and labelled with the attribute names
    (``Odd=1, Background=0``). The legend says which bar is the worst group."""
    data = {group: _finite(values) for group, values in group_acc.items()}
    groups = sorted((g for g, v in data.items() if v), key=lambda g: (str(type(g)), g))
    means = [statistics.fmean(data[g]) for g in groups]
    stds = [_spread(data[g]) for g in groups]
    cis = [_ci95(data[g]) for g in groups]
    worst = means.index(min(means)) if means else -1
    base = method_colors([method])[method] if method else "C0"
    colors = ["C3" if i == worst else base for i in range(len(groups))]
    labels = [_group_label(g, target, bias) for g in groups]
    fig = new_figure(max(5.5, 2.5 + 1.3 * len(groups)), 4.0)
    ax = fig.add_subplot()
    several = any(len(data[g]) > 1 for g in groups)
    bars = ax.bar(range(len(groups)), means, 0.7, yerr=cis if several else None, capsize=3,
                  color=colors, alpha=0.8)
    for bar, label in zip(bars, labels, strict=True):
        bar.set_gid(label)
    if several:
        for i, group in enumerate(groups):
            ax.scatter([i] * len(data[group]), data[group], s=14, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), [label.replace(", ", "\n") for label in labels])
    ax.set_xlabel(f"group: target {target} (y) and bias attribute {bias} (a)")
    ax.set_ylabel("test accuracy (%)")
    set_title(ax, title)
    _as_percent(ax)
    if groups:
        fig.legend(handles=[Patch(color="C3", alpha=0.8,
                                  label="worst group:\nits accuracy is the WGA"),
                            Patch(color=base, alpha=0.8, label="other groups")],
                   loc="outside right upper", fontsize="small")
    n = sorted({len(data[g]) for g in groups})
    caption(fig, f"bars: mean over {'/'.join(map(str, n)) or 0} seed(s)"
                  + ("; dots: each seed; " + CI_CAPTION if several else " (no error bars)"))
    save_figure(fig, path, [{"group": _group_label(g), "mean": m, "std": s, "ci95": c,
                       "values": data[g]}
                      for g, m, s, c in zip(groups, means, stds, cis, strict=True)])
    return fig


# ---------------------------------------------------------------------------- from MLflow


@dataclass(frozen=True)
class TargetRuns:
    """What the figures need of one target's parent run and its children."""

    target: str
    method: str
    bias: str
    searched: tuple[str, ...]
    search: tuple[Any, ...]
    seeds: tuple[Any, ...]
    #: The parent run's name: the target, or ``method/target`` in a study.
    name: str = ""
    #: The search metric (the parent's ``selection_metric`` tag).
    selection: str = ""

    @property
    def key(self) -> str:
        return self.name or self.target


def _searched(parent: Any, search: Sequence[Any]) -> tuple[str, ...]:
    """The hyperparameters the search varied: the parent's `best.*` params once the target is
    done; before that (a half-finished sweep), the params whose values differ between its
    search trials."""
    best = list(best_of_params(parent.data.params))
    if best:
        return tuple(sorted(best))
    names = {k for run in search for k in run.data.params} - {"seed"}
    return tuple(sorted(k for k in names
                        if len({run.data.params.get(k) for run in search}) > 1))


def load_target_runs(tracker: Tracker) -> list[TargetRuns]:
    """Every target's FINISHED search and seeds runs (seeds sorted by seed), read once."""
    out = []
    for name, parent in sorted(tracker.parent_runs().items()):
        target = parent.data.tags.get("target_attribute", name)
        pid = parent.info.run_id
        search = [r for r in tracker.child_runs(pid, "search") if r.info.status == "FINISHED"]
        seeds = [r for r in tracker.child_runs(pid, "seeds") if r.info.status == "FINISHED"]
        seeds.sort(key=lambda r: int(r.data.tags.get("seed", 0)))
        tags = parent.data.tags
        out.append(TargetRuns(target, tags.get("method", "?"), tags.get("bias_attribute", "?"),
                              _searched(parent, search), tuple(search), tuple(seeds), name,
                              tags.get("selection_metric", "")))
    return out


def _test_wga(targets: Sequence[TargetRuns]) -> dict[tuple[str, str], list[float]]:
    return {(t.target, t.method): [r.data.metrics[TEST_WGA] for r in t.seeds
                                   if TEST_WGA in r.data.metrics] for t in targets}


def _search_trials(targets: Sequence[TargetRuns]) -> list[dict[str, Any]]:
    return [{"method": t.method, "target": t.target, "params": dict(r.data.params),
             "metric": r.data.metrics[SELECTION_METRIC]}
            for t in targets for r in t.search if SELECTION_METRIC in r.data.metrics]


def _group_key(name: str) -> tuple[int, int] | str:
    """`{y}_{a}` as (y, a) so groups sort numerically; anything else as it came."""
    y, _, a = name.partition("_")
    return (int(y), int(a)) if y.isdigit() and a.isdigit() else name


def _group_accuracy(runs: Sequence[Any]) -> dict[Any, list[float]]:
    out: dict[Any, list[float]] = {}
    for run in runs:
        for key, value in run.data.metrics.items():
            if key.startswith(GROUP_ACC_PREFIX):
                out.setdefault(_group_key(key[len(GROUP_ACC_PREFIX):]), []).append(value)
    return out


def draw_sweep(tracker: Tracker, folder: Path | str,
               log_params: Collection[str] | None = None) -> dict[str, tuple[Path, Figure]]:
    """Write the sweep's figures into ``folder`` from MLflow alone, like ``--report``;
    returns {file stem: (path, figure)}.

    Stems: ``test_wga``, ``metric_vs_params``, ``group_accuracy_<pipeline>``, and each
    method's own (:meth:`Method.figures`: ``cluster_purity_<pipeline>`` for ClusterFix). A
    figure with no data yet (no finished seed runs, no searched params, no cluster metrics)
    is skipped rather than drawn empty. ``log_params``: the keys the search sampled on a log
    scale (the sweep file's ``log: true``); None (``--compare``, no file at hand) decides
    from the values."""
    folder = Path(folder)
    targets = load_target_runs(tracker)
    written: dict[str, tuple[Path, Figure]] = {}

    def emit(stem: str, draw: Any, *args: Any, **kwargs: Any) -> None:
        path = folder / f"{stem}.png"
        written[stem] = (path, draw(*args, path, **kwargs))

    wga = {k: v for k, v in _test_wga(targets).items() if v}
    if wga:
        emit("test_wga", plot_test_wga, wga)
    trials = _search_trials(targets)
    searched = sorted({p for t in targets for p in t.searched})
    if trials and searched:
        metric = next((t.selection for t in targets if t.selection), SELECTION_METRIC)
        emit("metric_vs_params", plot_metric_vs_params, trials, searched, metric,
             log_params=log_params)
    for t in targets:
        groups = _group_accuracy(t.seeds)
        if groups:
            emit(f"group_accuracy_{safe_name(t.key)}", plot_group_accuracy, groups,
                 title=f"{t.method}: per-group test accuracy of its best config "
                       f"(target {t.target}, bias {t.bias}, {len(t.seeds)} seed(s))",
                 target=t.target, bias=t.bias, method=t.method)
        written.update(_method_figures(t, folder))
    return written


def _method_figures(target: TargetRuns, folder: Path) -> dict[str, tuple[Path, Figure]]:
    """The figures the pipeline's method draws itself (:meth:`Method.figures`); none for a
    method this process cannot load (``--compare`` of a store from elsewhere)."""
    from debias.methods import MethodLoadError, resolve_method

    try:
        method = resolve_method(target.method)
    except MethodLoadError:
        return {}
    return method.figures(target, folder)


def sweep_plots(tracker: Tracker, folder: Path | str,
                log_params: Collection[str] | None = None) -> dict[str, Path]:
    """:func:`draw_sweep`, returning {file stem: path} of what was written."""
    return {stem: path for stem, (path, _) in draw_sweep(tracker, folder, log_params).items()}
