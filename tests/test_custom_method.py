"""A method from outside the package: examples/custom_method.py, copied to a folder outside
the checkout, runs a real Ray + MLflow sweep through `launch.py` with only PYTHONPATH set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, tiny_sweep

pytestmark = pytest.mark.slow


def test_a_method_defined_outside_the_package_runs_a_real_sweep(tmp_path: Path) -> None:
    plugins = tmp_path / "elsewhere"
    plugins.mkdir()
    shutil.copy(REPO / "examples" / "custom_method.py", plugins / "custom_method.py")
    shipped = yaml.safe_load((REPO / "examples" / "custom_method.yaml").read_text())
    assert shipped["method"] == "custom_method:FocalLoss"
    sweep = tiny_sweep(tmp_path, name="focal", method=shipped["method"], targets=["Odd"],
                       seeds=[0], focal={"gamma": 1.0},
                       search={"algorithm": "grid", "space": {
                           "focal.gamma": {"choice": [0.0, 2.0]}}})
    path = tmp_path / "focal.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(plugins), "RAY_USAGE_STATS_ENABLED": "0"}

    # Without the module on the path: one clear message, before Ray starts.
    bare = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    refused = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path)],
                             cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "cannot import module 'custom_method'" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "results").exists()

    done = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path),
                           "--num-cpus", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "custom_method:FocalLoss" in done.stdout

    client = MlflowClient(tracking_uri=sweep["tracking"]["uri"])
    exp = client.get_experiment_by_name("focal")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["method"] == "custom_method:FocalLoss"
    assert parent.data.tags["bias_labels"] == "none"
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.params["focal.gamma"] for r in children
                  if r.data.tags["phase"] == "search") == ["0.0", "2.0"]
    assert all(r.info.status == "FINISHED" and "focal/gamma" in r.data.metrics
               and "test/worst_group_acc" in r.data.metrics for r in children)
    assert [r.data.tags["seed"] for r in children if r.data.tags["phase"] == "seeds"] == ["0"]
