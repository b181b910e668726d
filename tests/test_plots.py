"""The sweep figures: what each draws (bars, series, lines) and, end to end, what
`sweep_plots` writes from a real MLflow sqlite store filled like a sweep fills it."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from debias.methods.clusterfix import plot_cluster_purity, weighted_purity
from debias.plots import (
    SELECTION_METRIC,
    plot_group_accuracy,
    plot_metric_vs_params,
    plot_test_wga,
    read_png_data,
    sweep_plots,
)
from debias.tracking import ROLE_TAG, Tracker


def _decodes(path: Path, min_side: int = 200) -> tuple[int, int]:
    """The file is a real PNG of a plausible size, not an empty or broken one."""
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
    assert min_side <= width <= 4000 and min_side <= height <= 4000
    return width, height


def _bars(fig: Figure) -> list:
    return [bar for c in fig.axes[0].containers if isinstance(c, BarContainer) for bar in c]


# ---------------------------------------------------------------------------- 1. test WGA


def test_test_wga_one_bar_per_target_method_at_the_seed_mean(tmp_path: Path) -> None:
    data = {("Bangs", "erm"): [0.40, 0.50, 0.45], ("Bangs", "clusterfix"): [0.70, 0.74],
            ("Hat", "erm"): [0.30], ("Hat", "clusterfix"): [0.60, 0.62, 0.64],
            ("Hat", "slim"): []}  # no seeds yet: no bar
    fig = plot_test_wga(data, tmp_path / "wga.png")
    bars = {bar.get_gid(): bar for bar in _bars(fig)}
    assert set(bars) == {"Bangs|erm", "Bangs|clusterfix", "Hat|erm", "Hat|clusterfix"}
    for gid, bar in bars.items():
        target, method = gid.split("|")
        assert bar.get_height() == pytest.approx(statistics.fmean(data[target, method]))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["erm", "clusterfix"]  # the report's order: ERM, the reference, first
    # a dot per seed: 3 + 2 + 1 + 3
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections
               if hasattr(c, "get_sizes") and len(c.get_sizes())) == 9
    # the method's bars sit next to each other within each target's slot
    assert bars["Bangs|erm"].get_x() < bars["Bangs|clusterfix"].get_x() < bars["Hat|erm"].get_x()
    assert bars["Bangs|erm"].get_facecolor() == bars["Hat|erm"].get_facecolor() \
        != bars["Hat|clusterfix"].get_facecolor()  # a colour per method
    assert "95% confidence interval" in fig.get_supxlabel().replace("\n", " ")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["Bangs", "Hat"]
    _decodes(tmp_path / "wga.png")
    drawn = read_png_data(tmp_path / "wga.png")
    row = next(r for r in drawn if r["target"] == "Bangs" and r["method"] == "erm")
    assert row["std"] == pytest.approx(statistics.stdev([0.40, 0.50, 0.45]))


# ---------------------------------------------------------------------------- 2. search


def _trials() -> list[dict]:
    trials = []
    for i, lr in enumerate([1e-5, 1e-4, 1e-3, 1e-2]):
        for target, bonus in (("Bangs", 0.0), ("Hat", 0.1)):
            trials.append({"method": "clusterfix", "target": target,
                           "metric": 0.5 + bonus + 0.01 * i,
                           "params": {"train.lr": str(lr), "clusterfix.k": str(2 + i),
                                      "train.optimizer": "adam" if i % 2 else "sgd"}})
    trials.append({"method": "clusterfix", "target": "Hat",
                   "metric": math.nan,  # a trial with no score: left out
                   "params": {"train.lr": "0.1", "clusterfix.k": "9", "train.optimizer": "x"}})
    return trials


def test_metric_vs_params_one_series_per_target_per_param(tmp_path: Path) -> None:
    params = ["train.lr", "clusterfix.k", "train.optimizer"]
    fig = plot_metric_vs_params(_trials(), params, "val/worst_group_acc", tmp_path / "m.png")
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["train.lr (log scale)", "train.optimizer",
                                                "clusterfix.k"]  # shared keys first
    for ax in axes:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["clusterfix / Bangs",
                                                        "clusterfix / Hat"]
        assert [len(line.get_xdata()) for line in lines] == [4, 4]
        assert ax.get_ylabel() == "val/worst_group_acc (%)"
    lr, opt, k = axes
    assert lr.get_xscale() == "log"  # 1e-5 .. 1e-2 spans three decades
    assert k.get_xscale() == "linear"  # 2 .. 5 does not
    assert sorted(lr.get_lines()[1].get_ydata()) == pytest.approx([0.6, 0.61, 0.62, 0.63])
    assert list(k.get_lines()[0].get_xdata()) == [2.0, 3.0, 4.0, 5.0]
    # categorical: ticks are the categories, markers sit on (or just beside) them
    assert [t.get_text() for t in opt.get_xticklabels()] == ["adam", "sgd"]
    for line in opt.get_lines():
        assert all(min(abs(x - 0), abs(x - 1)) < 0.2 for x in line.get_xdata())
    _decodes(tmp_path / "m.png")
    drawn = read_png_data(tmp_path / "m.png")
    assert drawn["metric"] == "val/worst_group_acc"
    assert [s["target"] for s in drawn["params"]["train.lr"]] == ["Bangs", "Hat"]
    # Told which keys were searched on a log scale, it follows that over the values' span.
    told = plot_metric_vs_params(_trials(), params, "val/worst_group_acc", tmp_path / "t.png",
                                 log_params={"clusterfix.k"})
    assert [ax.get_xscale() for ax in told.axes] == ["linear", "linear", "log"]


def test_metric_vs_params_skips_points_lacking_the_param(tmp_path: Path) -> None:
    trials = [{"method": "erm", "target": "A", "params": {"train.lr": "0.1"}, "metric": 0.5},
              {"method": "clusterfix", "target": "A", "params": {"clusterfix.k": "4"},
               "metric": 0.6}]
    fig = plot_metric_vs_params(trials, ["clusterfix.k", "train.lr", "jtt.lambda_up"], "m",
                                tmp_path / "x.png")
    lr, k = fig.axes  # no trial has jtt.lambda_up: no (empty) panel for it
    assert [line.get_label() for line in k.get_lines()] == ["clusterfix / A"]
    assert [line.get_label() for line in lr.get_lines()] == ["erm / A"]
    assert k.get_lines()[0].get_color() != lr.get_lines()[0].get_color()


# ---------------------------------------------------------------------------- 3. groups


def test_group_accuracy_bars_are_seed_means_labelled_by_group(tmp_path: Path) -> None:
    data = {(1, 1): [0.9, 0.8], (0, 0): [0.95, 0.97], (1, 0): [0.2, 0.4], (0, 1): [0.7, 0.7]}
    fig = plot_group_accuracy(data, tmp_path / "g.png", "Hat")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "y=0\na=0", "y=0\na=1", "y=1\na=0", "y=1\na=1"]
    heights = [bar.get_height() for bar in _bars(fig)]
    assert heights == pytest.approx([0.96, 0.7, 0.3, 0.85])
    # the worst group stands out
    colors = [bar.get_facecolor() for bar in _bars(fig)]
    assert colors[2] != colors[0] and colors[0] == colors[1] == colors[3]
    assert ax.get_title() == "Hat"
    assert "\n" in plot_group_accuracy(data, tmp_path / "g2.png", "long " * 40).axes[0].get_title()
    _decodes(tmp_path / "g.png")
    drawn = read_png_data(tmp_path / "g.png")
    assert drawn[2] == {"group": "y=1, a=0", "mean": pytest.approx(0.3),
                        "std": pytest.approx(statistics.stdev([0.2, 0.4])),
                        "ci95": pytest.approx(12.706 * statistics.stdev([0.2, 0.4]) / 2 ** 0.5,
                                              rel=1e-3),
                        "values": [0.2, 0.4]}
    # The error bars are the 95% intervals, as in the table (not the seeds' spread).
    (errors,) = [c.errorbar for c in ax.containers if isinstance(c, BarContainer)]
    segments = errors.lines[2][0].get_segments()
    assert segments[2][1][1] - segments[2][0][1] == pytest.approx(2 * drawn[2]["ci95"])


def test_group_accuracy_single_seed_has_no_error_bars(tmp_path: Path) -> None:
    fig = plot_group_accuracy({(0, 0): [0.9], (0, 1): [0.5]}, tmp_path / "g.png", "t")
    assert [bar.get_height() for bar in _bars(fig)] == pytest.approx([0.9, 0.5])
    assert all(c.errorbar is None for c in fig.axes[0].containers
               if isinstance(c, BarContainer))


# ---------------------------------------------------------------------------- 4. clusters


def test_cluster_purity_bars_sizes_and_weighted_mean_line(tmp_path: Path) -> None:
    sizes = {0: 100.0, 1: 300.0, 2: 0.0, 3: 50.0}
    purity = {0: 0.9, 1: 0.6, 3: 1.0}  # cluster 2 is empty: no purity logged
    fig = plot_cluster_purity(sizes, purity, tmp_path / "c.png", title="Hat vs Male",
                              clusters_per_class=2)
    ax = fig.axes[0]
    assert [bar.get_height() for bar in _bars(fig)] == pytest.approx([0.9, 0.6, 0.0, 1.0])
    expected = (100 * 0.9 + 300 * 0.6 + 50 * 1.0) / 450
    assert weighted_purity(sizes, purity) == pytest.approx(expected)
    (mean_line,) = [line for line in ax.get_lines() if line.get_gid() == "weighted_mean"]
    assert list(mean_line.get_ydata()) == pytest.approx([expected, expected])
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["n=100", "n=300", "empty", "n=50"]
    # coloured by the target class each cluster splits (k=2 per class)
    colors = [bar.get_facecolor() for bar in _bars(fig)]
    assert colors[0] == colors[1] != colors[2] == colors[3]
    _decodes(tmp_path / "c.png")
    assert read_png_data(tmp_path / "c.png")["weighted_mean"] == pytest.approx(expected)


# ---------------------------------------------------------------------------- end to end


def _run(client: MlflowClient, exp: str, name: str, tags: dict[str, str],
         params: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
         status: str = "FINISHED") -> str:
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()],
                     params=[Param(k, v) for k, v in (params or {}).items()],
                     tags=[RunTag("mlflow.runName", name)])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


SEED_WGA = {"Wearing_Hat": {0: 0.62, 1: 0.66, 2: 0.70}, "Bangs": {0: 0.40, 1: 0.50}}
METHOD = {"Wearing_Hat": "clusterfix", "Bangs": "erm"}
LRS = ["0.0001", "0.001", "0.01", "0.1"]


def _fill_store(uri: str) -> None:
    """A sweep's record as the Tracker writes it: parent per target, search and seed runs."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("plots")
    for target, method in METHOD.items():
        parent = _run(client, exp, target, {ROLE_TAG: "parent", "target_attribute": target,
                                            "method": method, "bias_attribute": "Male",
                                            "sweep": "plots"}, status="RUNNING")
        child = {"mlflow.parentRunId": parent, ROLE_TAG: "trial", "target_attribute": target,
                 "bias_attribute": "Male"}
        best = {"train.lr": "0.001"}
        if method == "clusterfix":
            best["clusterfix.k"] = "2"
        search_ids = []
        for i, lr in enumerate(LRS):
            params = {"train.lr": lr, "seed": "0", "train.epochs": "2", "target": target}
            if method == "clusterfix":
                params["clusterfix.k"] = str(2 + i)
            search_ids.append(_run(client, exp, f"search-{i}", {**child, "phase": "search",
                                                                "seed": "0"}, params,
                                   {SELECTION_METRIC: 0.5 + 0.05 * i,
                                    "val/worst_group_acc": 0.5 + 0.05 * i}))
        # a crashed search trial never logged its selection: not plotted
        _run(client, exp, "search-x", {**child, "phase": "search", "seed": "0"},
             {"train.lr": "1.0"}, {"train/loss": 1.0}, status="FAILED")
        for seed, wga in SEED_WGA[target].items():
            metrics = {"test/worst_group_acc": wga, SELECTION_METRIC: 0.6,
                       "test/group_acc/0_0": 0.95, "test/group_acc/0_1": wga + 0.1,
                       "test/group_acc/1_0": wga, "test/group_acc/1_1": 0.9}
            if method == "clusterfix":
                sizes, purity = [40, 60, 10, 90], [0.95, 0.8, 0.6, 1.0]
                for c in range(4):
                    metrics[f"clusterfix/cluster_size/{c}"] = sizes[c] + seed
                    metrics[f"clusterfix/cluster_purity/{c}"] = purity[c]
            _run(client, exp, f"seeds-{seed}", {**child, "phase": "seeds", "seed": str(seed)},
                 {**best, "seed": str(seed)}, metrics)
        # a seed run still RUNNING (or killed) is not a result yet
        _run(client, exp, "seeds-9", {**child, "phase": "seeds", "seed": "9"},
             {**best, "seed": "9"}, {"test/worst_group_acc": 0.01}, status="RUNNING")
        client.log_batch(parent, params=[Param(f"best.{k}", v) for k, v in
                                         {**best, "score": "0.6"}.items()])
        client.set_tag(parent, "best_run_id", search_ids[1])
        client.set_terminated(parent, "FINISHED")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    _fill_store(uri)
    return uri


def test_sweep_plots_from_a_real_mlflow_store(store: str, tmp_path: Path) -> None:
    tracker = Tracker(store, "plots", create=False)
    written = sweep_plots(tracker, tmp_path / "figs")
    assert set(written) == {"test_wga", "metric_vs_params", "group_accuracy_Wearing_Hat",
                            "group_accuracy_Bangs", "cluster_purity_Wearing_Hat"}
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{stem}.png" for stem in written)
    for path in written.values():
        assert path.parent == tmp_path / "figs"
        _decodes(path)

    wga = {(r["target"], r["method"]): r for r in read_png_data(written["test_wga"])}
    assert set(wga) == {("Wearing_Hat", "clusterfix"), ("Bangs", "erm")}
    for (target, _), row in wga.items():  # FINISHED seed runs only, never the RUNNING one
        assert row["values"] == pytest.approx(list(SEED_WGA[target].values()))
        assert row["mean"] == pytest.approx(statistics.fmean(SEED_WGA[target].values()))

    search = read_png_data(written["metric_vs_params"])
    assert search["metric"] == SELECTION_METRIC
    assert set(search["params"]) == {"train.lr", "clusterfix.k"}  # the best.* keys
    lr = {s["target"]: s for s in search["params"]["train.lr"]}
    assert {t: len(s["x"]) for t, s in lr.items()} == {"Bangs": 4, "Wearing_Hat": 4}
    assert sorted(lr["Bangs"]["x"]) == pytest.approx([float(v) for v in LRS])
    assert sorted(lr["Bangs"]["y"]) == pytest.approx([0.5, 0.55, 0.6, 0.65])
    k = {s["target"]: len(s["x"]) for s in search["params"]["clusterfix.k"]}
    assert k == {"Wearing_Hat": 4}  # erm trials have no clusterfix.k: no erm series there

    groups = read_png_data(written["group_accuracy_Bangs"])
    assert [g["group"] for g in groups] == ["y=0, a=0", "y=0, a=1", "y=1, a=0", "y=1, a=1"]
    assert groups[2]["values"] == pytest.approx([0.40, 0.50])
    assert groups[1]["mean"] == pytest.approx(0.55)

    clusters = read_png_data(written["cluster_purity_Wearing_Hat"])
    assert clusters["clusters"] == [0, 1, 2, 3]
    assert clusters["sizes"] == [40, 60, 10, 90]  # the first seed's (seed 0)
    assert clusters["weighted_mean"] == pytest.approx(
        (40 * 0.95 + 60 * 0.8 + 10 * 0.6 + 90 * 1.0) / 200)


def test_sweep_plots_skips_figures_without_data(store: str, tmp_path: Path) -> None:
    uri = store  # the same store, another sweep (experiment) that has no results yet
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("empty")
    _run(client, exp, "Hat", {ROLE_TAG: "parent", "target_attribute": "Hat",
                              "method": "clusterfix", "bias_attribute": "Male"},
         status="RUNNING")
    assert sweep_plots(Tracker(uri, "empty", create=False), tmp_path / "figs") == {}
    assert not (tmp_path / "figs").exists() or not any((tmp_path / "figs").iterdir())


# ---------------------------------------------------------------------------- a study


STUDY = {"erm": {}, "jtt": {"jtt.lambda_up": ["3", "6", "12"]},
         "groupdro": {"groupdro.eta": ["0.003", "0.01", "0.1"]}}
LOG_KEYS = {"train.lr", "jtt.lambda_up", "groupdro.eta"}


def _fill_study(uri: str) -> None:
    """A study's record: a parent per method (one target), its search trials over the shared
    train.* keys and its own key, its seed runs, as a sweep writes them."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study")
    for m, (method, own) in enumerate(STUDY.items()):
        parent = _run(client, exp, f"{method}/Odd", {
            ROLE_TAG: "parent", "target_attribute": "Odd", "method": method,
            "bias_attribute": "Background", "selection_metric": "val/worst_group_acc"},
            status="RUNNING")
        child = {"mlflow.parentRunId": parent, ROLE_TAG: "trial", "method": method}
        for i, (lr, epochs) in enumerate((("0.02", "6"), ("0.05", "10"), ("0.1", "10"))):
            params = {"train.lr": lr, "train.epochs": epochs, "seed": "1000",
                      **{k: v[i] for k, v in own.items()}}
            _run(client, exp, f"search-{i}", {**child, "phase": "search", "seed": "1000"},
                 params, {SELECTION_METRIC: 0.4 + 0.1 * m + 0.02 * i})
        for seed in (0, 1, 2):
            wga = 0.35 + 0.15 * m + 0.03 * seed
            _run(client, exp, f"seeds-{seed}", {**child, "phase": "seeds", "seed": str(seed)},
                 {"train.lr": "0.05", "seed": str(seed)},
                 {"test/worst_group_acc": wga, "test/group_acc/0_0": 0.98,
                  "test/group_acc/0_1": wga, "test/group_acc/1_0": wga + 0.05,
                  "test/group_acc/1_1": 0.97})
        best = {"train.lr": "0.05", "train.epochs": "10", **{k: v[1] for k, v in own.items()}}
        client.log_batch(parent, params=[Param(f"best.{k}", v) for k, v in
                                         {**best, "score": "0.5"}.items()])
        client.set_terminated(parent, "FINISHED")


def test_every_figure_of_a_study_explains_itself(tmp_path: Path) -> None:
    """Rendered from a real store: a colour and a legend entry per method, log axes for the
    log-searched keys, percent and labels on every axis, no empty panel, a caption saying what
    the error bars are."""
    from matplotlib.ticker import PercentFormatter

    from debias.plots import draw_sweep, method_colors

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fill_study(uri)
    figures = draw_sweep(Tracker(uri, "study", create=False), tmp_path / "plots",
                         log_params=LOG_KEYS)
    assert set(figures) == {"test_wga", "metric_vs_params", "group_accuracy_erm_Odd",
                            "group_accuracy_jtt_Odd", "group_accuracy_groupdro_Odd"}
    colors = method_colors(STUDY)
    for stem, (path, fig) in figures.items():
        _decodes(path)
        assert fig.get_supxlabel(), f"{stem}: no caption"
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), f"{stem}: an axis without a label"
            assert ax.get_lines() or ax.containers, f"{stem}: an empty panel"

    _, wga = figures["test_wga"]
    assert [t.get_text() for t in wga.legends[0].get_texts()] == ["erm", "groupdro", "jtt"]
    assert isinstance(wga.axes[0].yaxis.get_major_formatter(), PercentFormatter)
    for _, fig in figures.values():  # accuracies read in percent, as in the table
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
            assert ticks and all(t.endswith("%") for t in ticks), ticks
    assert "95% confidence interval" in wga.get_supxlabel().replace("\n", " ")
    bars = {b.get_gid(): b for b in _bars(wga)}
    from matplotlib.colors import to_rgba
    for method in STUDY:
        assert bars[f"Odd|{method}"].get_facecolor()[:3] == to_rgba(colors[method])[:3]

    _, search = figures["metric_vs_params"]
    assert [t.get_text() for t in search.legends[0].get_texts()] == ["erm", "groupdro", "jtt"]
    panels = {ax.get_xlabel().replace(" (log scale)", ""): ax for ax in search.axes}
    assert set(panels) == {"train.lr", "train.epochs", "jtt.lambda_up", "groupdro.eta"}
    assert {k for k, ax in panels.items() if ax.get_xscale() == "log"} == LOG_KEYS
    assert all(ax.get_ylabel() == "val/worst_group_acc (%)" for ax in search.axes)
    shared = panels["train.lr"].get_lines()
    assert [line.get_label() for line in shared] == ["erm / Odd", "groupdro / Odd",
                                                     "jtt / Odd"]
    assert [line.get_color() for line in shared] == [colors[m] for m in
                                                     ("erm", "groupdro", "jtt")]
    assert [line.get_label() for line in panels["jtt.lambda_up"].get_lines()] == ["jtt / Odd"]

    _, groups = figures["group_accuracy_jtt_Odd"]
    ax = groups.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][1] == "Odd=0\nBackground=1"
    assert "Odd" in ax.get_xlabel() and "Background" in ax.get_xlabel()
    legend = [t.get_text() for t in groups.legends[0].get_texts()]
    assert legend == ["worst group:\nits accuracy is the WGA", "other groups"]
    worst = min(_bars(groups), key=lambda b: b.get_height())
    assert worst.get_gid() == "Odd=0, Background=1"
    assert worst.get_facecolor()[:3] == to_rgba("C3")[:3]
    assert "95% confidence interval" in groups.get_supxlabel().replace("\n", " ")
