"""`--submit` runs the sweep's driver as a Ray Job on a head node (here: a local Ray head
with its dashboard on 127.0.0.1, started by the test); `--status NAME` follows it."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from debias.cli import main
from tests.conftest import REPO, tiny_sweep, write_sweep
from tests.test_resume import _env, _ray_pids, kill_new_ray_processes

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submitted_sweep_runs_as_a_ray_job_and_status_follows_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    env = _env(ray_tmp)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env['PATH']}"  # the job's `python` is this venv
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    before = _ray_pids()
    try:
        # The agent's port too: its default (52365) may be held by another Ray on this
        # machine (the test session's own), and a head whose agent cannot bind answers
        # every submission with "No available agent".
        subprocess.run([str(REPO / ".venv" / "bin" / "ray"), "start", "--head",
                        f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                        f"--dashboard-agent-listen-port={agent}",
                        f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        address = f"http://127.0.0.1:{dashboard}"
        # Relative paths in the file resolve on the head, against --remote-workdir.
        sweep = tiny_sweep(tmp_path, name="jobbed", targets=["Odd"], seeds=[0],
                           search={"num_samples": 1}, storage="results",
                           tracking={"uri": "sqlite:///store/mlflow.db"})
        path = write_sweep(tmp_path, sweep)
        remote = tmp_path / "head"
        (remote / "store").mkdir(parents=True)
        assert main([str(path), "--submit", "--address", address,
                     "--remote-workdir", str(remote)]) == 0
        assert "submitted debias-jobbed-" in capsys.readouterr().out

        deadline = time.monotonic() + 300
        status = ""
        while time.monotonic() < deadline:
            main(["--status", "jobbed", "--address", address])
            status = capsys.readouterr().out
            if any(s in status.splitlines()[0] for s in ("SUCCEEDED", "FAILED", "STOPPED")):
                break
            time.sleep(2)
        assert "SUCCEEDED" in status.splitlines()[0], status
        assert "MLflow: experiment 'jobbed'" in status
        assert "test WGA" in status or "Odd" in status  # the job's report, in its log tail
    finally:
        kill_new_ray_processes(before)

    client = MlflowClient(tracking_uri=f"sqlite:///{remote / 'store' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("jobbed")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 3  # parent + 2
    assert (remote / "results" / "jobbed" / "report.md").is_file()
    assert not os.path.exists(tmp_path / "results")  # nothing resolved against the laptop


def test_status_of_an_unknown_address_is_a_clear_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--status", "x", "--address", f"http://127.0.0.1:{_free_port()}"]) == 1
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err
