"""Sweep bookkeeping under faults: Ctrl-C, kills in any phase, tracking outages, a changed
configuration on --resume, a trial that crashes after its best epoch, stray processes, and
the selected model kept. Real drivers (`launch.py` subprocesses), a real local Ray, a real
MLflow (sqlite, or an `mlflow server` that is killed and restarted)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, check_sweep_runs, tiny_sweep, write_sweep
from tests.test_resume import _env, _ray_pids, kill_new_ray_processes
from tests.test_tracking_writer import MlflowServer, wait_for

pytestmark = pytest.mark.slow


def _runs(uri: str, name: str) -> list[Any]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], max_results=10_000) if exp else []


def _count(db: Path, phase: str, status: str | None = None) -> int:
    """Trial runs of a phase in the sqlite store (in a status, or in any)."""
    if not db.exists():
        return 0
    query = ("select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
             "where t.key = 'phase' and t.value = ?")
    args: list[str] = [phase]
    if status:
        query += " and r.status = ?"
        args.append(status)
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return int(con.execute(query, args).fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _pids_with_env(name: str, value: str) -> list[int]:
    """Processes whose environment has name=value (what every process of a driver's local
    Ray inherits, whatever Ray renames its command line to)."""
    needle = f"{name}={value}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    out.append(int(entry))
    return out


def _describe(ray_tmp: Path) -> str:
    out = []
    for pid in _pids_with_env("RAY_TMPDIR", str(ray_tmp)):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100]
            env = [e for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                   if e.startswith(b"DEBIAS_WATCHDOG")]
            out.append(f"{pid} {cmd!r} {env}")
    return "; ".join(out)


def _launch(path: Path, tmp_path: Path, ray_tmp: Path, *extra: str,
            log: str = "driver.log", env: dict[str, str] | None = None) -> subprocess.Popen:
    out = (tmp_path / log).open("w")
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), str(path),
                             "--num-cpus", "2", *extra], cwd=tmp_path,
                            env={**_env(ray_tmp), **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)


def test_ctrl_c_mid_search_then_a_kill_in_the_seeds_phase_lose_nothing(tmp_path: Path) -> None:
    """SIGINT during the search: exit 130, nothing FINISHED that did not finish, no seeds
    phase on the partial search. --resume, SIGKILLed once the seeds phase has started: no
    process of its Ray is left. --resume again: exactly one run per trial, and the parent's
    best config and the seeds runs are those of the complete search."""
    sweep = tiny_sweep(tmp_path, name="faulty", targets=["Odd"], seeds=[0, 1])
    sweep["search"]["num_samples"] = 3
    sweep["train"]["epochs"] = 3
    path = write_sweep(tmp_path, sweep)
    db = tmp_path / "mlflow.db"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))
    before = _ray_pids()
    try:
        driver = _launch(path, tmp_path, ray_tmp, log="first.log")
        wait_for(lambda: _count(db, "search", "FINISHED") >= 1 or driver.poll() is not None,
                 300, "a finished search trial")
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
        text = (tmp_path / "first.log").read_text()
        ours = [line for line in text.splitlines() if not line.startswith("\x1b[36m(")]
        assert "interrupted" in text and "--resume" in text
        assert not [line for line in ours if "Traceback" in line]  # Ray workers' own aside
        runs = _runs(f"sqlite:///{db}", "faulty")
        assert not [r for r in runs if r.info.status == "RUNNING"]
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert parent.info.status == "KILLED" and "best.score" not in parent.data.params
        assert _count(db, "seeds") == 0  # no seeds phase on a partial search
        assert _count(db, "search", "FINISHED") < 3
        assert any(r.info.status == "KILLED" and "interrupted" in r.data.tags.get("note", "")
                   for r in runs if r.data.tags.get("phase") == "search")

        # --resume, SIGKILLed once a seeds trial has started.
        driver = _launch(path, tmp_path, ray_tmp, "--resume", log="second.log")
        wait_for(lambda: _count(db, "seeds") >= 1 or driver.poll() is not None, 300,
                 "the seeds phase to start")
        assert driver.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        # The driver's watchdog kills its local Ray: no process of it is left listening.
        try:
            wait_for(lambda: not _pids_with_env("RAY_TMPDIR", str(ray_tmp)), 60,
                     "the killed driver's Ray processes to go")
        except pytest.fail.Exception:
            pytest.fail(f"the killed driver's Ray processes are still there after 60 s: "
                        f"{_describe(ray_tmp)}")

        resumed = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path),
                                  "--num-cpus", "2", "--resume"], cwd=tmp_path,
                                 env=_env(ray_tmp), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        kill_new_ray_processes(before)
    check_sweep_runs(f"sqlite:///{db}", "faulty", {"Odd": "Background"}, n_search=3,
                     seeds=[0, 1], epochs=3)
    runs = _runs(f"sqlite:///{db}", "faulty")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    search = [r for r in runs if r.data.tags.get("phase") == "search"
              and r.info.status == "FINISHED"]
    assert len(search) == 3
    top = max(r.data.metrics["selected/score"] for r in search)
    phase, trial_id = parent.data.tags["best_trial"].split("/")
    (best,) = [r for r in search if r.data.tags["ray_trial_id"] == trial_id]
    assert phase == "search" and best.data.metrics["selected/score"] == top
    assert float(parent.data.params["best.score"]) == top
    assert parent.data.params["best.train.lr"] == best.data.params["train.lr"]
    for run in runs:  # (a marked orphan of the killed driver may lack its params)
        if run.data.tags.get("phase") == "seeds" and run.info.status == "FINISHED":
            assert run.data.params["train.lr"] == best.data.params["train.lr"]


def test_best_config_comes_only_from_trials_that_finished_without_error(
        ray_local, tmp_path: Path) -> None:
    """The trial with the better validation score crashes after its last (best) epoch on
    every attempt: the sweep reports it FAILED and re-runs the other config for the seeds."""
    from debias.export import evaluate, export_sweep, load_model
    from debias.spec import load_spec
    from debias.sweep import run_sweep
    from debias.tracking import Tracker

    sweep = tiny_sweep(tmp_path, name="lucky", targets=["Odd"], seeds=[0], max_failures=0,
                       train={"epochs": 3, "batch_size": 64, "lr": 0.05},
                       search={"algorithm": "grid", "metric": "val/avg_acc", "space": {
                           "train.lr": {"choice": [0.0001, 0.1]}}},
                       debug={"fail_lr": 0.1})
    spec = load_spec(write_sweep(tmp_path, sweep))
    run_sweep(spec)
    runs = _runs(spec.tracking_uri, "lucky")
    search = {r.data.params["train.lr"]: r for r in runs if r.data.tags.get("phase") == "search"}
    crashed, survivor = search["0.1"], search["0.0001"]
    assert crashed.info.status == "FAILED" and "injected failure" in crashed.data.tags["error"]
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    lucky = max(m.value for m in client.get_metric_history(crashed.info.run_id, "val/avg_acc"))
    assert lucky > survivor.data.metrics["selected/score"]  # it would have won
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["best.train.lr"] == "0.0001"
    (seed_run,) = [r for r in runs if r.data.tags.get("phase") == "seeds"]
    assert seed_run.data.params["train.lr"] == "0.0001"

    # The selected model is kept and logged; rebuilt, it reproduces its logged test metrics.
    (folder,) = export_sweep(Tracker(spec.tracking_uri, "lucky"), tmp_path / "export")
    exported = load_model(folder)
    scored = evaluate(exported, "test")
    logged = seed_run.data.metrics
    for key in ("test/worst_group_acc", "test/avg_acc", "test/group_acc/0_1"):
        assert scored[key] == logged[key], key
    assert exported.config["train"]["lr"] == 0.0001


def test_a_deterministic_failure_is_not_retried_and_the_error_names_its_cause(
        ray_local, tmp_path: Path) -> None:
    from debias.spec import load_spec
    from debias.sweep import SweepError, run_sweep

    sweep = tiny_sweep(tmp_path, name="baddata", targets=["Odd"], seeds=[0], max_failures=3,
                       debug={"bad_data": True})
    spec = load_spec(write_sweep(tmp_path, sweep))
    with pytest.raises(SweepError, match=r"every search trial failed \(DatasetError: "
                                         r"debug.bad_data"):
        run_sweep(spec)
    runs = [r for r in _runs(spec.tracking_uri, "baddata") if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2 and all(r.info.status == "FAILED" for r in runs)
    for run in runs:
        assert run.data.tags["error"].startswith("DatasetError: debug.bad_data")
        assert "retried" not in run.data.tags  # ended at once, not max_failures times


def test_resume_refuses_a_changed_configuration_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from debias.cli import main
    from debias.preflight import record_config
    from debias.spec import load_spec

    path = write_sweep(tmp_path, tiny_sweep(tmp_path))
    record_config(load_spec(path))  # as if it had started
    code = main([str(path), "--resume", "--set", "train.epochs=3", "--set", "seeds=[0, 2]"])
    assert code == 1
    err = capsys.readouterr().err
    assert "train.epochs: 2 → 3" in err and "seeds: [0, 1] → [0, 2]" in err
    assert "--set name=NEW_NAME" in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing written to MLflow
    # Where and how many trials run may change: it is not a new configuration.
    from debias.preflight import check_resume_config

    check_resume_config(load_spec(path, ["resources.cpu=2", "max_failures=5"]))


def test_a_trial_that_failed_for_good_stays_failed_on_resume_unless_retried(
        ray_local, tmp_path: Path) -> None:
    from debias.spec import load_spec
    from debias.sweep import SweepError, run_sweep

    sweep = tiny_sweep(tmp_path, name="stubborn", targets=["Odd"], seeds=[0, 1],
                       max_failures=0, debug={"fail_seed": 1},
                       search={"algorithm": "grid", "space": {
                           "train.lr": {"choice": [0.05]}}})
    spec = load_spec(write_sweep(tmp_path, sweep))
    run_sweep(spec)

    def failed_end() -> list[int]:
        return [r.info.end_time for r in _runs(spec.tracking_uri, "stubborn")
                if r.data.tags.get("seed") == "1" and r.info.status == "FAILED"]

    (first,) = failed_end()
    run_sweep(spec, resume=True)
    assert failed_end() == [first]  # not run again
    with contextlib.suppress(SweepError):
        run_sweep(spec, resume=True, retry_failed=True)
    (again,) = failed_end()
    assert again > first  # ran again (and failed again): still one run for the trial


def test_asha_budget_rules_are_checked_up_front(tmp_path: Path) -> None:
    from debias.spec import SpecError, validate
    from debias.sweep import _max_epochs

    with pytest.raises(SpecError, match=r"scheduler.asha.grace_period: got 5; expected at "
                                        r"most train.epochs \(2\)"):
        validate(tiny_sweep(tmp_path, scheduler={"asha": {"grace_period": 5}}), cwd=tmp_path)
    searched = tiny_sweep(tmp_path, scheduler={"asha": {"grace_period": 2}}, search={
        "space": {"train.epochs": {"int": [3, 9]}}})
    spec = validate(searched, cwd=tmp_path)
    assert _max_epochs(spec, "erm") == 9  # every trial's own epochs fit in ASHA's budget
    with pytest.raises(SpecError, match="fewest epochs a trial can have"):
        validate(tiny_sweep(tmp_path, scheduler={"asha": {"grace_period": 4}}, search={
            "space": {"train.epochs": {"int": [3, 9]}}}), cwd=tmp_path)


def test_new_labels_at_the_same_dataset_root_change_every_stage_key(tmp_path: Path) -> None:
    import csv

    from debias.data import clear_cache, load_grouped
    from debias.stages import reference_key
    from tests.test_data import make_waterbirds

    root = make_waterbirds(tmp_path / "wb")
    cfg = {"name": "waterbirds", "root": str(root)}
    config = {"dataset": cfg, "target": "Object", "bias": "Place", "seed": 0,
              "backbone": {"arch": "small_cnn", "weights": "none"},
              "train": {"epochs": 1}, "reference": {"epochs": 1}, "cache_dir": str(tmp_path)}
    before = load_grouped(cfg, "Object", "Place")
    key = reference_key(config, before)
    meta = root / "metadata.csv"
    rows = list(csv.DictReader(meta.open()))
    rows[0]["y"] = str(1 - int(rows[0]["y"]))  # one label changed, same path, same images
    with meta.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    clear_cache()
    after = load_grouped(cfg, "Object", "Place")
    assert after.identity() != before.identity()
    assert reference_key(config, after) != key


def test_a_killed_ui_leaves_no_mlflow_server(tmp_path: Path) -> None:
    from debias.cli import main

    sweep = tiny_sweep(tmp_path)
    path = write_sweep(tmp_path, sweep)
    from debias.tracking import Tracker

    Tracker(sweep["tracking"]["uri"], "tiny")  # an experiment to show
    assert main([str(path), "--dry-run"]) == 0
    out = tmp_path / "ui.log"
    ui = subprocess.Popen([sys.executable, str(REPO / "launch.py"), str(path), "--ui",
                           "--port", "0"], cwd=tmp_path, stdout=out.open("w"),
                          stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    db = str(tmp_path / "mlflow.db")

    def servers() -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                    if b"mlflow" in cmd and b"server" in cmd and db.encode() in cmd:
                        found.append(int(entry))
        return found

    try:
        wait_for(lambda: "http://127.0.0.1" in out.read_text() or ui.poll() is not None, 180,
                 "the UI to answer")
        assert ui.poll() is None, out.read_text()[-2000:]
        assert servers()
        ui.send_signal(signal.SIGKILL)
        ui.wait(timeout=30)
        wait_for(lambda: not servers(), 60, "the killed UI's mlflow server to go")
    finally:
        if ui.poll() is None:
            ui.kill()
        for pid in servers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- tracking outages


def _outage_sweep(tmp_path: Path, server: MlflowServer, name: str) -> Path:
    sweep = tiny_sweep(tmp_path, name=name, targets=["Odd"], seeds=[0, 1],
                       tracking={"uri": server.uri})
    sweep["train"]["epochs"] = 3
    return write_sweep(tmp_path, sweep)


def _journal(tmp_path: Path, name: str) -> Path:
    return tmp_path / "results" / name / ".mlflow-journal" / "journal.jsonl"


def _journaled(tmp_path: Path, name: str) -> int:
    path = _journal(tmp_path, name)
    return path.read_text().count("\n") if path.exists() else 0


@pytest.fixture()
def server(tmp_path: Path):
    srv = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


def test_a_tracking_server_restart_mid_sweep_neither_stalls_nor_stops_it(
        tmp_path: Path, server: MlflowServer) -> None:
    """Killed once the sweep is running; restarted once writes have been journaled: the
    sweep goes on scheduling trials meanwhile and exits 0 with every run complete, once."""
    path = _outage_sweep(tmp_path, server, "outage")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ro", dir="/tmp"))
    before = _ray_pids()
    try:
        driver = _launch(path, tmp_path, ray_tmp)
        client = MlflowClient(tracking_uri=server.uri)

        def trial_runs() -> int:
            exp = client.get_experiment_by_name("outage")
            return len([r for r in client.search_runs([exp.experiment_id])
                        if "mlflow.parentRunId" in r.data.tags]) if exp else 0

        wait_for(lambda: trial_runs() >= 1 or driver.poll() is not None, 300, "a trial run")
        server.kill()
        wait_for(lambda: _journaled(tmp_path, "outage") >= 3 or driver.poll() is not None,
                 300, "writes to be journaled during the outage")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        server.start()
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        kill_new_ray_processes(before)
    check_sweep_runs(server.uri, "outage", {"Odd": "Background"}, n_search=2, seeds=[0, 1],
                     epochs=3)


def test_a_tracking_server_down_until_the_sweep_ends_is_synced_afterwards(
        tmp_path: Path, server: MlflowServer) -> None:
    """Killed mid-sweep and kept down past the sweep's end (longer than MLflow's own retry
    window matters not: the writer never relies on it): every trial still runs, the sweep
    says what is pending, and one --sync once the server is back leaves every run complete,
    once, none RUNNING, every epoch's metrics present."""
    path = _outage_sweep(tmp_path, server, "longoutage")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
    before = _ray_pids()
    try:
        driver = _launch(path, tmp_path, ray_tmp, env={"DEBIAS_TRACKING_DRAIN_S": "3"})
        wait_for(lambda: (tmp_path / "results" / "longoutage" / "tune").exists()
                 or driver.poll() is not None, 300, "the sweep to start")
        server.kill()
        assert driver.wait(timeout=600) == 3, (tmp_path / "driver.log").read_text()[-3000:]
        text = (tmp_path / "driver.log").read_text()
        assert "journaled" in text and "--sync" in text
        ours = [line for line in text.splitlines() if not line.startswith("\x1b[36m(")]
        assert not [line for line in ours if "Traceback" in line]  # Ray workers' own aside
        pending = _journaled(tmp_path, "longoutage")
        assert pending > 0
        # Every trial ran, by Ray's own record: each trial folder holds its checkpoint.
        tune_dir = tmp_path / "results" / "longoutage" / "tune"
        trials = [d for d in tune_dir.glob("*_*") if d.is_dir() and any(d.glob("checkpoint_*"))]
        assert len(trials) == 2 + 2, sorted(d.name for d in tune_dir.iterdir())
    finally:
        kill_new_ray_processes(before)
    server.start()
    synced = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path), "--sync"],
                            cwd=tmp_path, env=_env(ray_tmp), capture_output=True, text=True,
                            timeout=600)
    assert synced.returncode == 0, synced.stdout[-3000:] + synced.stderr[-3000:]
    check_sweep_runs(server.uri, "longoutage", {"Odd": "Background"}, n_search=2,
                     seeds=[0, 1], epochs=3)
    assert not _journaled(tmp_path, "longoutage")
    # A second --sync writes nothing twice.
    again = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path), "--sync"],
                           cwd=tmp_path, env=_env(ray_tmp), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "0 of 0" in again.stdout
    check_sweep_runs(server.uri, "longoutage", {"Odd": "Background"}, n_search=2,
                     seeds=[0, 1], epochs=3)
