"""A sweep on a three-node Ray cluster (head + two workers, `ray.cluster_utils.Cluster`)
that loses a worker node mid-trial: trials spread over both workers, every trial still
finishes, the ones that were on the lost node resume from their last checkpoint, and MLflow
holds exactly one finished run per trial."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, tiny_sweep, write_sweep
from tests.test_resume import _env, _ray_pids, kill_new_ray_processes

pytestmark = pytest.mark.slow


def _run_scenario(name: str, sweep_file: Path) -> str:
    """Run tests/scenarios/NAME.py on the sweep file in its own process (its Ray stopped
    after, whatever happens); returns its output, asserting it exited 0."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # AF_UNIX paths are short
    before = _ray_pids()
    try:
        proc = subprocess.run([sys.executable, "-m", f"tests.scenarios.{name}", str(sweep_file)],
                              cwd=REPO, env=_env(ray_tmp), capture_output=True, text=True,
                              timeout=600)
    finally:
        kill_new_ray_processes(before)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def test_losing_a_worker_node_mid_trial_loses_nothing(tmp_path: Path) -> None:
    epochs = 6
    # Both search trials start together, so each runs on its own 1-CPU worker (a warm worker
    # would otherwise take them one after another on a slow machine).
    sweep = tiny_sweep(tmp_path, name="nodes", targets=["Odd"], seeds=[0, 1], max_failures=3,
                       debug={"start_together": 2},
                       train={"epochs": epochs, "batch_size": 128, "lr": 0.05},
                       search={"algorithm": "random", "num_samples": 2,
                               "space": {"train.lr": {"float": [0.01, 0.1], "log": True}}})
    log = _run_scenario("node_loss", write_sweep(tmp_path, sweep))
    assert "SCENARIO: removed worker node" in log, log[-4000:]
    workers = log.split("SCENARIO: workers ")[1].splitlines()[0]

    client = MlflowClient(tracking_uri=sweep["tracking"]["uri"])
    exp = client.get_experiment_by_name("nodes")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 4  # 2 search + 2 seeds trials, one run each
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    ids = [(r.data.tags["phase"], r.data.tags["ray_trial_id"]) for r in runs]
    assert len(set(ids)) == len(ids)
    nodes = {n for r in runs for n in r.data.tags["ray_nodes"].split(",")}
    assert len(nodes) == 2 and all(n in workers for n in nodes), (nodes, workers)
    retried = [r for r in runs if r.data.tags.get("retried") == "true"]
    assert retried, "no trial was running on the removed node"
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, epochs + 1)), steps
    for run in retried:
        # It ran on the lost node and then on the other one.
        assert len(run.data.tags["ray_nodes"].split(",")) == 2


def test_each_shared_stage_is_computed_once_across_two_nodes(tmp_path: Path) -> None:
    """A ClusterFix sweep on a 0-CPU head and two 1-CPU workers sharing one storage path:
    trials run on both nodes, and each stage key (reference model, features) is computed
    exactly once cluster-wide, by a stage task, never by a trial."""
    import json
    from collections import Counter

    # The two search trials start together, so each runs on its own 1-CPU worker.
    sweep = tiny_sweep(tmp_path, name="stages", targets=["Odd"], seeds=[0, 1],
                       debug={"start_together": 2},
                       method="clusterfix", reference={"epochs": 1}, clusterfix={"k": 2},
                       train={"epochs": 3, "batch_size": 128, "lr": 0.05},
                       search={"algorithm": "grid", "space": {
                           "clusterfix.k": {"choice": [2, 3]}}})
    log = _run_scenario("two_nodes", write_sweep(tmp_path, sweep))
    workers = log.split("SCENARIO: workers ")[1].splitlines()[0]

    tasks = [json.loads(line) for line in
             (tmp_path / "results" / "cache" / "stage_tasks.jsonl").read_text().splitlines()]
    keys = Counter(t["key"] for t in tasks)
    assert keys and max(keys.values()) == 1, keys  # no key twice, on any node
    # The search's seed and each of the 2 reported seeds: a reference model and features each.
    assert Counter(t["stage"] for t in tasks) == {"reference": 3, "features": 3}
    assert all(t["node"] in workers for t in tasks)

    client = MlflowClient(tracking_uri=sweep["tracking"]["uri"])
    exp = client.get_experiment_by_name("stages")
    runs = [r for r in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2 + 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        for stage in ("reference", "features"):
            assert run.data.metrics.get(f"cache/computed/{stage}", 0) == 0, (run, stage)
    nodes = {n for r in runs for n in r.data.tags["ray_nodes"].split(",")}
    assert len(nodes) == 2 and all(n in workers for n in nodes), (nodes, workers)
