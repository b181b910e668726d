"""Shared fixtures: a real local Ray (2 CPUs) and sweep files written into a temp dir."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

import contextlib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the in-process sweep tests, stopped at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             configure_logging=False, ignore_reinit_error=True)  # an earlier test's may be up
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that pins torch's thread count (for exact numbers) leaves it as it found it:
    CPU results depend on the number of threads, so a leaked count would change the numbers
    of every later test in the process (and make them differ between a run of one file and
    the suite)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _ray_local_released(request: pytest.FixtureRequest):
    """After a test on the shared local Ray: every CPU must come back. What still holds one
    (an actor or placement group a sweep left behind) is named in a warning and removed, so
    one leak cannot deadlock a later test that needs the whole node."""
    yield
    if "ray_local" not in request.fixturenames:
        return
    import time
    import warnings

    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_actors

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    if ray.available_resources().get("CPU", 0) >= total:
        return
    actors = list_actors(filters=[("state", "=", "ALIVE")])
    groups = {pid: pg for pid, pg in placement_group_table().items()
              if pg.get("state") == "CREATED"}
    warnings.warn(f"{request.node.nodeid} left {total - ray.available_resources().get('CPU', 0)}"
                  f" CPU(s) held: actors {[a.class_name for a in actors]}, placement groups "
                  f"{list(groups)}; removing them", stacklevel=1)
    for pid in groups:  # removing a group also stops the actors placed in it
        with contextlib.suppress(Exception):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pid)))


def tiny_sweep(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A sweep small enough for CI: 16 px synthetic images, 2 epochs, 2 search trials."""
    sweep: dict[str, Any] = {
        "name": "tiny",
        "method": "erm",
        "dataset": {"name": "synthetic", "image_size": 16, "size": 1500},
        "targets": ["Odd", "Loopy"],
        "bias_attribute": "Background",
        "seeds": [0, 1],
        "backbone": {"arch": "small_cnn", "weights": "none"},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.05},
        "search": {"algorithm": "optuna", "num_samples": 2,
                   "space": {"train.lr": {"float": [0.01, 0.1], "log": True}}},
        "resources": {"cpu": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": str(tmp_path / "results"),
    }
    sweep.update(overrides)
    return sweep


def write_sweep(tmp_path: Path, sweep: dict[str, Any], name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def check_sweep_runs(uri: str, name: str, targets: dict[str, str], n_search: int,
                     seeds: list[int], epochs: int, method: str = "erm") -> None:
    """Assert the MLflow record of a finished sweep matches DESIGN.md's contract exactly."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    assert exp is not None, f"no experiment {name!r}"
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    assert not [r for r in runs if r.info.status == "RUNNING"], "runs left RUNNING"
    parents = {r.data.tags["target_attribute"]: r for r in runs
               if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == set(targets)
    for target, parent in parents.items():
        tags = parent.data.tags
        assert parent.info.run_name == target
        assert parent.info.status == "FINISHED"
        assert tags["sweep"] == name and tags["method"] == method
        assert tags["dataset"] == "synthetic" and tags["bias_attribute"] == targets[target]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        finished = [r for r in children if r.info.status == "FINISHED"]
        # Anything else must be a marked orphan of a killed driver, never a silent duplicate.
        for r in children:
            if r.info.status != "FINISHED":
                assert r.info.status == "KILLED" and "orphaned" in r.data.tags.get("note", "")
        by_phase = {p: [r for r in finished if r.data.tags["phase"] == p]
                    for p in ("search", "seeds")}
        assert len(by_phase["search"]) == n_search
        assert sorted(int(r.data.tags["seed"]) for r in by_phase["seeds"]) == sorted(seeds)
        ids = [(r.data.tags["phase"], r.data.tags["ray_trial_id"]) for r in children]
        assert len(ids) == len(set(ids)), "two runs for one trial"
        for run in finished:
            t, p, m = run.data.tags, run.data.params, run.data.metrics
            assert {"seed", "config_hash", "phase", "ray_trial_id"} <= set(t)
            if t["phase"] == "search":  # which sampler drew the config
                assert t["search/sampler"] in ("fixed", "random", "grid", "tpe-startup", "tpe")
            assert p["target"] == target and p["dataset.name"] == "synthetic"
            assert p["seed"] == t["seed"] and "train.lr" in p
            for key in ("train/loss", "val/avg_acc", "val/worst_group_acc", "test/avg_acc",
                        "test/worst_group_acc", "val/group_acc/0_0", "test/group_acc/1_1"):
                assert key in m, f"{key} not logged on {run.info.run_name}"
                assert 0.0 <= m[key] <= 1.0 or key == "train/loss"
            steps = [h.step for h in client.get_metric_history(run.info.run_id,
                                                               "val/worst_group_acc")]
            assert sorted(steps) == list(range(1, epochs + 1)), steps
