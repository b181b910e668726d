"""A real sweep end to end: sweep file -> Ray Tune + Optuna -> trainable -> MLflow -> report."""

from __future__ import annotations

from pathlib import Path

import pytest

from debias.cli import main
from debias.spec import load_spec
from debias.sweep import SweepError, run_sweep
from tests.conftest import check_sweep_runs, tiny_sweep, write_sweep

pytestmark = pytest.mark.slow


def test_two_target_sweep_logs_the_design_runs_and_reports(
        ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    spec = load_spec(path)
    run_sweep(spec)
    check_sweep_runs(spec.tracking_uri, "tiny", {"Odd": "Background", "Loopy": "Background"},
                     n_search=2, seeds=[0, 1], epochs=2)

    assert main([str(path), "--report"]) == 0
    out = capsys.readouterr().out
    assert "Odd" in out and "Loopy" in out and "±" in out
    csv_text = (tmp_path / "results" / "tiny" / "report.csv").read_text()
    assert csv_text.count("\n") == 3  # header + one row per target
    assert "train.lr=" in (tmp_path / "results" / "tiny" / "report.md").read_text()
    from debias.plots import read_png_data

    plots = tmp_path / "results" / "tiny" / "plots"
    assert {p.name for p in plots.glob("*.png")} >= {
        "test_wga.png", "metric_vs_params.png", "group_accuracy_Odd.png",
        "group_accuracy_Loopy.png"}
    drawn = read_png_data(plots / "metric_vs_params.png")
    assert set(drawn["params"]) == {"train.lr"}, drawn

    # Running the same sweep again without --resume must refuse, not duplicate runs.
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(spec)


def _computed(runs: list, stages: tuple[str, ...]) -> dict[str, float]:
    """How many times the sweep's trials computed each shared stage (summed over runs)."""
    return {stage: sum(r.data.metrics.get(f"cache/computed/{stage}", 0) for r in runs)
            for stage in stages}


def _children(uri: str, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if "mlflow.parentRunId" in r.data.tags]


def test_a_crashed_trial_resumes_from_its_checkpoint_with_identical_metrics(
        ray_local, tmp_path: Path) -> None:
    """A trial that crashes after epoch 1 is retried from the epoch-1 checkpoint: its one
    MLflow run finishes with steps 1..3 and exactly the metrics of an uninterrupted run."""
    from mlflow.tracking import MlflowClient

    common = {"targets": ["Odd"], "seeds": [0], "search": {"num_samples": 1},
              "train": {"epochs": 3, "batch_size": 128, "lr": 0.05}}
    faulty = load_spec(write_sweep(tmp_path, tiny_sweep(
        tmp_path, name="faulty", max_failures=1, debug={"fail_once_at_epoch": 1}, **common),
        "faulty.yaml"))
    clean = load_spec(write_sweep(tmp_path, tiny_sweep(tmp_path, name="clean", **common),
                                  "clean.yaml"))
    run_sweep(faulty)
    run_sweep(clean)
    client = MlflowClient(tracking_uri=faulty.tracking_uri)
    runs = {name: {r.data.tags["phase"]: r for r in _children(faulty.tracking_uri, name)}
            for name in ("faulty", "clean")}
    for phase in ("search", "seeds"):
        crashed, ref = runs["faulty"][phase], runs["clean"][phase]
        assert crashed.info.status == "FINISHED"
        assert crashed.data.tags.get("retried") == "true"
        history = client.get_metric_history(crashed.info.run_id, "val/worst_group_acc")
        assert sorted(h.step for h in history) == [1, 2, 3]
        for key in ("train/loss", "val/avg_acc", "test/worst_group_acc", "test/avg_acc"):
            assert crashed.data.metrics[key] == ref.data.metrics[key], key


def test_a_trial_that_keeps_failing_is_recorded_and_the_others_finish(
        ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tiny_sweep(tmp_path, name="broken", targets=["Odd"], seeds=[0, 1], max_failures=1,
                       search={"num_samples": 1}, debug={"fail_seed": 1})
    path = write_sweep(tmp_path, sweep)
    assert main([str(path)]) == 0
    seeds_runs = {r.data.tags["seed"]: r for r in _children(sweep["tracking"]["uri"], "broken")
                  if r.data.tags["phase"] == "seeds"}
    assert seeds_runs["0"].info.status == "FINISHED"
    assert seeds_runs["1"].info.status == "FAILED"
    assert "injected failure of seed 1" in seeds_runs["1"].data.tags["error"]
    out = capsys.readouterr().out
    assert "Odd" in out  # the report still comes, over the seeds that finished


def _tasks(spec) -> dict[str, int]:
    """How many stage tasks the planner ran, per stage (each logs one line)."""
    import json
    from collections import Counter

    path = spec.storage / "cache" / "stage_tasks.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    assert len({r["key"] for r in lines}) == len(lines), "a stage key computed twice"
    return dict(Counter(r["stage"] for r in lines))


def _phase(runs: list, phase: str) -> list:
    return [r for r in runs if r.data.tags["phase"] == phase]


def test_clusterfix_sweep_over_k_extracts_features_once(ray_local, tmp_path: Path) -> None:
    """Trials of a k sweep share the reference model and the features through the stage
    cache: across the search's trials (one search seed), each is computed exactly once; the
    reported seed re-runs each of them once, its own (tagged stage/<name> on every run)."""
    sweep = tiny_sweep(
        tmp_path, name="cfix", method="clusterfix", targets=["Odd"], seeds=[0],
        reference={"epochs": 1}, clusterfix={"k": 2, "beta": 0.1},
        search={"algorithm": "grid", "space": {"clusterfix.k": {"choice": [2, 3]}}})
    spec = load_spec(write_sweep(tmp_path, sweep))
    run_sweep(spec)
    check_sweep_runs(spec.tracking_uri, "cfix", {"Odd": "Background"}, n_search=2, seeds=[0],
                     epochs=2, method="clusterfix")
    runs = _children(spec.tracking_uri, "cfix")
    stages = ("reference", "features", "kmeans")
    # The planner computed the reference model and the features as Ray tasks before the
    # trials (never inside one), once for the search's seed and once for the reported seed;
    # k-means, seconds per k, stays in the trials.
    for phase, kmeans in (("search", 2), ("seeds", 1)):
        computed = _computed(_phase(runs, phase), stages)
        assert computed == {"reference": 0, "features": 0, "kmeans": kmeans}, (phase, computed)
    assert all(r.data.metrics.get("cache/computed/features", 0) == 0 for r in runs)
    assert _tasks(spec) == {"reference": 2, "features": 2}
    # Stage keys match within the search and differ for the reported seed.
    search_keys = {r.data.tags["stage/kmeans"].split(",")[0] for r in _phase(runs, "search")}
    assert len(search_keys) == 2  # one k-means per k, on one shared feature matrix
    (seed_run,) = _phase(runs, "seeds")
    assert seed_run.data.tags["stage/kmeans"] not in search_keys
    for r in runs:
        assert 0.5 <= r.data.metrics["clusterfix/mean_purity"] <= 1.0
        assert r.data.metrics["clusterfix/weight_max"] >= 1.0
        assert "val/worst_pseudo_group_acc" in r.data.metrics


@pytest.mark.parametrize("resources", [{"cpu": 1, "gpu": 1}, {"cpu": 8}])
def test_a_trial_no_node_can_hold_fails_fast(ray_local, tmp_path: Path,
                                             resources: dict[str, float]) -> None:
    spec = load_spec(write_sweep(tmp_path, tiny_sweep(tmp_path, resources=resources)))
    with pytest.raises(SweepError, match="no node of this Ray cluster can ever provide"):
        run_sweep(spec)


def test_slim_sweep_shares_gradcam_and_logs_overlays(ray_local, tmp_path: Path) -> None:
    """Trials that differ only in retraining knobs reuse one GradCAM pass and one curation;
    every run carries the GradCAM overlays as artifacts and the annotation count."""
    from mlflow.tracking import MlflowClient

    sweep = tiny_sweep(
        tmp_path, name="slimmy", method="slim", targets=["Odd"], seeds=[0],
        reference={"epochs": 1}, slim={"budget_per_class": 5, "curated_size": 60,
                                       "embedding": "pca"},
        search={"algorithm": "grid", "space": {"train.lr": {"choice": [0.01, 0.05]},
                                               "slim.retrain": {"choice": ["full"]}}})
    spec = load_spec(write_sweep(tmp_path, sweep))
    run_sweep(spec)
    check_sweep_runs(spec.tracking_uri, "slimmy", {"Odd": "Background"}, n_search=2,
                     seeds=[0], epochs=2, method="slim")
    runs = _children(spec.tracking_uri, "slimmy")
    for phase in ("search", "seeds"):  # the curation in the trials, once per seed
        computed = _computed(_phase(runs, phase), ("reference", "gradcam", "curation"))
        assert computed == {"reference": 0, "gradcam": 0, "curation": 1}, (phase, computed)
    # reference and GradCAM: Ray tasks planned before the trials, once per seed
    assert _tasks(spec) == {"reference": 2, "gradcam": 2}
    assert len({r.data.tags["stage/curation"] for r in _phase(runs, "search")}) == 1
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    for r in runs:
        assert r.data.metrics["slim/annotated"] == 10
        assert 40 <= r.data.metrics["slim/curated_size"] <= 60  # int(60 x weight) per cell
        assert 0 <= r.data.metrics["slim/aiou_mean"] <= 1  # the synthetic data has masks
        pngs = [a.path for a in client.list_artifacts(r.info.run_id, "gradcam")]
        assert len([p for p in pngs if p.endswith("_overlay.png")]) == 8, pngs


def test_slim_last_layer_sweep_logs_one_step_per_grid_point(ray_local, tmp_path: Path) -> None:
    """Last-layer trials through real Ray Tune and MLflow: each grid point is a logged step,
    and trials that differ only in the number of retrains share the reference model, one
    GradCAM pass over validation, one feature extraction and every curation they have in
    common."""
    sweep = tiny_sweep(
        tmp_path, name="slimll", method="slim", targets=["Odd"], seeds=[0],
        reference={"epochs": 1},
        slim={"retrain": "last_layer", "budget_per_class": 5, "curated_size": 60,
              "keep_quantile": 0.0, "c_grid": [1.0, 0.1], "class_weight_ratios": [1, 3],
              "embedding": "pca"},
        search={"algorithm": "grid", "max_concurrent": 1,  # one at a time: "computed once"
                "space": {"slim.retrains": {"choice": [1, 2]}}})  # is then exact
    spec = load_spec(write_sweep(tmp_path, sweep))
    run_sweep(spec)
    check_sweep_runs(spec.tracking_uri, "slimll", {"Odd": "Background"}, n_search=2,
                     seeds=[0], epochs=6, method="slim")
    runs = _children(spec.tracking_uri, "slimll")
    stages = ("reference", "gradcam", "features", "space", "curation")
    computed = _computed(_phase(runs, "search"), stages)
    # retrains 1 -> curation 0; retrains 2 -> curation 0 reused, curation 1. The reference
    # model, GradCAM and the features are the planner's Ray tasks, never a trial's.
    assert computed == {"reference": 0, "gradcam": 0, "features": 0, "space": 1,
                        "curation": 2}, computed
    # The reported seed re-runs every stage once, with as many curations as it retrains.
    (seed_run,) = _phase(runs, "seeds")
    computed = _computed([seed_run], stages)
    assert computed == {"reference": 0, "gradcam": 0, "features": 0, "space": 1,
                        "curation": int(seed_run.data.params["slim.retrains"])}, computed
    assert _tasks(spec) == {"reference": 2, "gradcam": 2, "features": 2}
    for r in runs:
        m = r.data.metrics
        assert m["last_layer/grid_size"] == 6 and m["slim/annotated"] == 10
        assert m["last_layer/val_selection_size"] > 0 and "last_layer/C" in m
        assert r.data.params["slim.retrain"] == "last_layer"


def test_gpu_fractions_pack_only_when_the_cpu_request_leaves_room() -> None:
    """{cpu: 4, gpu: 0.5} on a {CPU: 4, GPU: 1} node runs one trial, not two: the driver says
    so with the numbers; {cpu: 2, gpu: 0.5} packs two and says nothing. The shipped GPU
    sweep files pack as their comments promise on cluster.yaml's worker type."""
    import yaml

    from debias.cluster import packing_warnings, trials_per_node

    node = [("node type gpu_worker", {"CPU": 4.0, "GPU": 1.0}, True)]
    (warning,) = packing_warnings({"cpu": 4, "gpu": 0.5}, node)
    assert "runs 1 trial(s) at once, not the 2" in warning and "cpu <= 2" in warning
    assert packing_warnings({"cpu": 2, "gpu": 0.5}, node) == []
    assert packing_warnings({"cpu": 1, "gpu": 0}, node) == []
    assert trials_per_node({"cpu": 2, "gpu": 0.5}, {"CPU": 4, "GPU": 1}) == 2
    assert trials_per_node({"cpu": 1, "gpu": 0.25}, {"CPU": 4, "GPU": 1}) == 4
    from tests.conftest import REPO

    workers = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    gpu_node = {k.upper() if k.lower() in ("cpu", "gpu") else k: float(v)
                for k, v in workers["gpu_worker"]["resources"].items()}
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        res = yaml.safe_load(path.read_text()).get("resources", {})
        if float(res.get("gpu", 0)) > 0:
            shipped = [("gpu_worker", gpu_node, True)]
            assert packing_warnings({"cpu": res["cpu"], "gpu": res["gpu"]}, shipped) == [], path
            assert trials_per_node(res, gpu_node) == int(1 / res["gpu"]), path
