"""A driver killed with SIGKILL mid-sweep, then `--resume`: the sweep finishes with exactly
one finished MLflow run per trial, none stuck in RUNNING."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, check_sweep_runs, tiny_sweep, write_sweep

pytestmark = pytest.mark.slow


def _env(ray_tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _finished_children(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            row = con.execute(
                "select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'phase' and r.status = 'FINISHED'").fetchone()
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    return int(row[0])


def _ray_pids() -> set[int]:
    pids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "ray" in cmd or "gcs_server" in cmd:
                pids.add(int(pid))
    return pids


def _started_by_a_test_driver(pid: int) -> bool:
    """Whether `pid` belongs to a Ray that a test's subprocess started: those run with their
    own RAY_TMPDIR (`_env`), which every process of that Ray inherits. The Ray this pytest
    process runs (`ray_local`) spawns workers at any time and must be left alone."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    own = os.environ.get("RAY_TMPDIR", "").encode()
    tmpdirs = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RAY_TMPDIR=")]
    return bool(tmpdirs) and tmpdirs[0] != own


def kill_new_ray_processes(before: set[int]) -> None:
    """A SIGKILLed driver leaves its GCS, raylet and agents (renamed ray::DashboardAgent...)
    behind: stop every Ray process a test's driver started that was not there before."""
    for pid in _ray_pids() - before:
        if _started_by_a_test_driver(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_killed_driver_resumes_without_lost_or_duplicate_runs(tmp_path: Path) -> None:
    # ClusterFix, so the kill also meets the stage cache (reference model, features, k-means).
    sweep = tiny_sweep(tmp_path, name="killme", targets=["Odd"], seeds=[0, 1, 2],
                       method="clusterfix", reference={"epochs": 1}, clusterfix={"k": 2})
    sweep["search"]["num_samples"] = 4
    sweep["train"]["epochs"] = 3
    path = write_sweep(tmp_path, sweep)
    db = tmp_path / "mlflow.db"
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # AF_UNIX paths are short
    before = _ray_pids()
    cmd = [sys.executable, str(REPO / "launch.py"), str(path), "--num-cpus", "2"]
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=_env(ray_tmp), stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while _finished_children(db) < 2:  # kill it once some trials have finished
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "sweep made no progress"
            time.sleep(0.5)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_new_ray_processes(before)
    assert _finished_children(db) < 4 + 3, "the sweep finished before it was killed"

    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=_env(ray_tmp),
                             capture_output=True, text=True, timeout=600)
    kill_new_ray_processes(before)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep 'killme'" in resumed.stdout + resumed.stderr
    check_sweep_runs(f"sqlite:///{db}", "killme", {"Odd": "Background"}, n_search=4,
                     seeds=[0, 1, 2], epochs=3, method="clusterfix")
    assert "Odd" in resumed.stdout and "±" in resumed.stdout

    # The Optuna study continued rather than restarted: a restarted TPE sampler (same seed)
    # would propose its first values again, so the four search trials would repeat values.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("killme")
    lrs = [r.data.params["train.lr"] for r in client.search_runs([exp.experiment_id])
           if r.data.tags.get("phase") == "search" and r.info.status == "FINISHED"]
    assert len(lrs) == 4 and len(set(lrs)) == 4, lrs
    # The stage cache survived the kill: every file in it loads (a write cut off by the kill
    # can only leave a temp file, which is never read).
    import torch

    cache = tmp_path / "results" / "cache"
    files = list(cache.rglob("*.pt"))
    assert {f.parent.name for f in files} >= {"reference", "features", "kmeans"}
    for f in files:
        assert isinstance(torch.load(f, weights_only=True), dict)


def test_a_trial_resumes_from_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    """A checkpoint cut short (a kill mid-write, a full disk) failed the trial for good, and
    its NaN epoch stopped the driver's reconciliation: the trial now resumes from the newest
    checkpoint that loads (Tune keeps two), or from scratch, and says which."""
    from ray import tune

    from debias.spec import load_spec
    from debias.sweep_log import _epoch
    from debias.trainable import STATE_FILE, _resume, build_trial

    sweep = tiny_sweep(tmp_path, targets=["Odd"], seeds=[0],
                       dataset={"name": "synthetic", "image_size": 8, "size": 100},
                       train={"epochs": 3, "batch_size": 64, "lr": 0.05})
    spec = load_spec(write_sweep(tmp_path, sweep))
    config = spec.trial_base("Odd")
    trainer = build_trial(config)
    trial_dir = tmp_path / "search_x"
    for index, _ in zip(range(2), trainer.epochs(), strict=False):
        folder = trial_dir / f"checkpoint_00000{index}"
        folder.mkdir(parents=True)
        trainer.save(folder / STATE_FILE)
    newest = trial_dir / "checkpoint_000001" / STATE_FILE
    newest.write_bytes(newest.read_bytes()[:100])

    resumed, note = _resume(config, tune.Checkpoint.from_directory(newest.parent))
    assert resumed.epoch == 1  # the older checkpoint's epoch
    assert note is not None and note.startswith("resumed from checkpoint_000000: "
                                                "checkpoint_000001 does not load")
    (trial_dir / "checkpoint_000000" / STATE_FILE).write_bytes(b"")
    fresh, note = _resume(config, tune.Checkpoint.from_directory(newest.parent))
    assert fresh.epoch == 0 and note is not None and note.startswith("restarted from scratch")
    assert _resume(config, None)[1] is None
    # A failure's report has no epoch (NaN in Ray's result table): no crash, no step.
    assert _epoch({"epoch": float("nan")}) is None and _epoch({"epoch": 2.0}) == 2
