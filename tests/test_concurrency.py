"""Several processes on one tracking store: sweeps of the same name started together, new
stores opened by several programs at once, credentials kept out of every file and line.

Real drivers (`launch.py` subprocesses, each with its own local Ray) on one real sqlite
store, and on one real `mlflow server` backed by a real PostgreSQL (started here: initdb in
a temp folder, a free port, as the `postgres` user when the tests run as root), as
cluster.yaml's head runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, check_sweep_runs, write_sweep
from tests.test_resume import _env, _ray_pids, kill_new_ray_processes
from tests.test_tracking_writer import MlflowServer, free_port, wait_for

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Pa55word"


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class Postgres:
    """A PostgreSQL server of its own: a fresh cluster in a temp folder, on a free loopback
    port, stopped (and its folder removed) at the end. As root it runs as `postgres`."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        if self.bin is None:
            pytest.fail("PostgreSQL is not installed (.ci/system-deps.sh installs it)")
        self.root = Path(tempfile.mkdtemp(prefix="debias-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                        "--init-groups", "--"]

    def start(self) -> None:
        data = self.root / "data"
        subprocess.run([*self._as, str(self.bin / "initdb"), "-D", str(data), "-U",
                        "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        log = open(self.root / "server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self._as, str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port),
             "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail("postgres exited:\n" + (self.root / "server.log").read_text())
            return self.psql("SELECT 1", check=False).returncode == 0

        wait_for(ready, 60, "PostgreSQL to accept connections")

    def psql(self, sql: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                               "-U", "postgres", "-d", "postgres", "-tAc", sql],
                              capture_output=True, text=True, check=check, timeout=30)

    def database(self, name: str) -> str:
        """A new, empty database; its SQLAlchemy URI (trust auth: any password is taken)."""
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def pg_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[MlflowServer]:
    """`mlflow server` on PostgreSQL, as cluster.yaml's head runs it."""
    server = MlflowServer(tmp_path_factory.mktemp("pg_mlflow"),
                          backend=postgres.database("mlflow"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


# --------------------------------------------------------------------------- helpers


def _sweep(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """F: a 2-trial ERM sweep on the embedded data at 8 px, 1 epoch, one seed."""
    sweep: dict[str, Any] = {
        "name": "same", "method": "erm",
        "dataset": {"name": "synthetic", "image_size": 8, "size": 100},
        "targets": ["Odd"], "bias_attribute": "Background", "seeds": [0],
        "backbone": {"arch": "small_cnn", "weights": "none"},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "search": {"algorithm": "random", "num_samples": 2,
                   "space": {"train.lr": {"float": [0.01, 0.1], "log": True}}},
        "resources": {"cpu": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": str(tmp_path / "results"),
    }
    sweep.update(overrides)
    return sweep


def _start(tmp_path: Path, path: Path, ray_tmp: Path, log: str, *extra: str,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = (tmp_path / log).open("w")
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), str(path), "--num-cpus",
                             "1", *extra], cwd=tmp_path, env={**_env(ray_tmp), **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT)


def _runs(uri: str, name: str) -> list[Any]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], max_results=10_000) if exp else []


def _ours(text: str) -> list[str]:
    """The driver's own lines (not those Ray forwards from its workers)."""
    return [line for line in text.splitlines() if not line.startswith("\x1b[36m(")]


def _race(tmp_path: Path, path: Path, ray_tmp: Path, extra: dict[str, list[str]],
          env: dict[str, str] | None = None) -> tuple[str, str, subprocess.Popen[bytes]]:
    """Start two drivers of one sweep name at once; wait for the one that is refused.
    Returns (the refused one's name, the other's name, the other's process)."""
    procs = {name: _start(tmp_path, path, ray_tmp, f"{name}.log", *args, env=env)
             for name, args in extra.items()}
    wait_for(lambda: any(p.poll() is not None for p in procs.values()), 240,
             "one of two sweeps of one name to be refused")
    (loser,) = [n for n, p in procs.items() if p.poll() is not None]
    (winner,) = [n for n in procs if n != loser]
    text = (tmp_path / f"{loser}.log").read_text()
    assert procs[loser].returncode == 1, text[-3000:]
    assert procs[winner].poll() is None, (tmp_path / f"{winner}.log").read_text()[-3000:]
    return loser, winner, procs[winner]


# --------------------------------------------------------------------------- tests


def test_a_sweep_of_the_same_name_is_refused_and_a_corrupt_checkpoint_restarts(
        tmp_path: Path) -> None:
    """Issue #1 on one sqlite store: two sweeps of one name (different storage) started
    together: one is refused before its Ray starts, naming the other; nothing of it is
    written. Issue #4: the other is SIGKILLed mid-search, the newest checkpoint of a
    trial that had not finished is cut short, and --resume finishes every run exactly once:
    the trial resumes from the newest checkpoint that loads, here none: from scratch, named
    on its run (test_resume.py checks the fall-back to an older checkpoint)."""
    sweep = _sweep(tmp_path, dataset={"name": "synthetic", "image_size": 16, "size": 1500},
                   train={"epochs": 3, "batch_size": 64, "lr": 0.05})
    path = write_sweep(tmp_path, sweep)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    before = _ray_pids()
    try:
        loser, winner, driver = _race(tmp_path, path, ray_tmp, {
            "a": ["--set", f"storage={tmp_path / 'store_a'}"],
            "b": ["--set", f"storage={tmp_path / 'store_b'}"]},
            env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
        refusal = (tmp_path / f"{loser}.log").read_text()
        assert "is already running" in refusal and str(tmp_path / f"store_{winner}") in refusal
        assert not (tmp_path / f"store_{loser}" / "same" / "tune").exists()
        assert not [line for line in _ours(refusal) if "Traceback" in line]

        # Kill the winner while a search trial is between two epochs.
        tune_dir = tmp_path / f"store_{winner}" / "same" / "tune"

        def epochs_saved(trial: Path) -> int:  # Tune keeps the newest two checkpoints
            return max((int(p.parent.name.split("_")[1]) + 1
                        for p in trial.glob("checkpoint_*/state.pt")), default=0)

        def mid_trial() -> list[Path]:
            """Trials between two epochs whose checkpoint Tune's saved state already names
            (the state is saved every second here, so it lags the files a little)."""
            saved: set[str] = set()
            for state in tune_dir.glob("experiment_state-*.json"):
                try:
                    data = json.loads(state.read_text())
                except (OSError, ValueError):  # being written
                    continue
                for trial, meta in data.get("trial_data", []):
                    if "checkpoint_dir_name" in str(meta):
                        saved.update(re.findall(r"trial_id\W+([0-9a-f]{8})", str(trial))[:1])
            return [d for d in tune_dir.glob("search_*") if 1 <= epochs_saved(d) < 3
                    and d.name.split("_", 1)[1] in saved]

        wait_for(lambda: mid_trial() or driver.poll() is not None, 300, "a trial mid-way")
        assert driver.poll() is None, (tmp_path / f"{winner}.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        kill_new_ray_processes(before)
        unfinished = [d for d in tune_dir.glob("search_*") if 1 <= epochs_saved(d) < 3]
        assert unfinished
        cut = []
        for trial in unfinished:  # its checkpoints, cut short as by a kill mid-write (all of
            # them: which one Tune's last saved state names lags behind the files)
            for state in trial.glob("checkpoint_*/state.pt"):
                state.write_bytes(state.read_bytes()[:100])
            cut.append(trial.name.split("_", 1)[1])

        resumed = subprocess.run(
            [sys.executable, str(REPO / "launch.py"), str(path), "--num-cpus", "2", "--set",
             f"storage={tmp_path / f'store_{winner}'}", "--resume"], cwd=tmp_path,
            env=_env(ray_tmp), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        kill_new_ray_processes(before)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    check_sweep_runs(uri, "same", {"Odd": "Background"}, n_search=2, seeds=[0], epochs=3)
    runs = _runs(uri, "same")
    parents = [r for r in runs if r.data.tags.get("debias.role") == "parent"]
    assert len(parents) == 1  # nothing of the refused sweep
    restarted = [r for r in runs if r.data.tags.get("ray_trial_id") in cut]
    assert restarted and all(
        r.data.tags.get("checkpoint", "").startswith("restarted from scratch: checkpoint_")
        and "does not load" in r.data.tags["checkpoint"] for r in restarted), [
        r.data.tags.get("checkpoint") for r in restarted]
    assert all(r.info.status == "FINISHED" for r in restarted)

    # The finished sweep's commands exit by themselves (--export used to wait for ever on
    # MLflow's idle download threads); a truncated model is named, never exported.
    store = ["--set", f"storage={tmp_path / f'store_{winner}'}"]
    (seed_run,) = [r for r in runs if r.data.tags.get("phase") == "seeds"]
    from urllib.parse import urlparse

    model = Path(urlparse(seed_run.info.artifact_uri).path) / "model" / "state_dict.pt"
    good = model.read_bytes()
    for target, code, expect in ((tmp_path / "sweep.yaml", 1, "is a file, not a folder"),
                                 (tmp_path / "cut", 1, "does not load with weights_only"),
                                 (tmp_path / "models", 0, "exported")):
        model.write_bytes(good if code == 0 else good[:200])
        done = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path), *store,
                               "--export", str(target)], cwd=tmp_path, env=_env(ray_tmp),
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == code and expect in done.stdout + done.stderr, done.stderr
    import torch

    (folder,) = (tmp_path / "models" / "Odd").glob("seed_*")
    assert torch.load(folder / "state_dict.pt", weights_only=True)
    assert not list((tmp_path / "cut").rglob("state_dict.pt"))


def test_sweeps_on_a_postgresql_backed_server_one_at_a_time_hangup_credentials(
        tmp_path: Path, pg_server: MlflowServer) -> None:
    """On `mlflow server` backed by PostgreSQL, with the password in the URI given by --set:
    the second sweep of one name is refused (#1); SIGHUP stops the first as Ctrl-C does
    (#7: exit 130, one line, parent KILLED); the printed --resume command keeps every --set
    (#5) with the password masked, and run as printed (the credentials from
    MLFLOW_TRACKING_USERNAME/PASSWORD) finishes the sweep; the password is in no file under
    storage and in no line printed (#6)."""
    host = pg_server.uri.split("//", 1)[1]
    uri = f"http://alice:{PASSWORD}@{host}"
    path = write_sweep(tmp_path, _sweep(tmp_path, name="shared"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp", dir="/tmp"))
    before = _ray_pids()
    sets = {n: ["--set", f"tracking.uri={uri}", "--set", f"storage={tmp_path / f'st_{n}'}"]
            for n in ("a", "b")}
    try:
        loser, winner, driver = _race(tmp_path, path, ray_tmp, sets)
        assert "is already running" in (tmp_path / f"{loser}.log").read_text()
        client = MlflowClient(tracking_uri=pg_server.uri)

        def trial_runs() -> int:
            exp = client.get_experiment_by_name("shared")
            return len([r for r in client.search_runs([exp.experiment_id])
                        if r.data.tags.get("debias.role") == "trial"]) if exp else 0

        wait_for(lambda: trial_runs() >= 1 or driver.poll() is not None, 300, "a trial run")
        assert driver.poll() is None, (tmp_path / f"{winner}.log").read_text()[-3000:]
        driver.send_signal(signal.SIGHUP)
        assert driver.wait(timeout=120) == 130, (tmp_path / f"{winner}.log").read_text()[-3000:]
        kill_new_ray_processes(before)
        text = (tmp_path / f"{winner}.log").read_text()
        assert not [line for line in _ours(text) if "Traceback" in line]
        (parent,) = [r for r in _runs(pg_server.uri, "shared")
                     if r.data.tags.get("debias.role") == "parent"]
        assert parent.info.status == "KILLED"
        line = next(line for line in text.splitlines() if "Continue with: " in line)
        command = shlex.split(line.split("Continue with: ", 1)[1])
        assert command[:2] == ["python", "launch.py"] and command[-1] == "--resume"
        assert f"storage={tmp_path / f'st_{winner}'}" in command
        assert f"tracking.uri=http://***@{host}" in command  # masked, kept

        # Run as printed: without credentials it says what is missing ...
        argv = [sys.executable, str(REPO / "launch.py"), *command[2:], "--num-cpus", "2"]
        bare = subprocess.run(argv, cwd=tmp_path, env=_env(ray_tmp), capture_output=True,
                              text=True, timeout=120)
        assert bare.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in bare.stderr
        # ... and with them in the environment it finishes the sweep.
        env = {**_env(ray_tmp), "MLFLOW_TRACKING_USERNAME": "alice",
               "MLFLOW_TRACKING_PASSWORD": PASSWORD}
        resumed = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD" in resumed.stderr
    finally:
        kill_new_ray_processes(before)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    check_sweep_runs(pg_server.uri, "shared", {"Odd": "Background"}, n_search=2, seeds=[0],
                     epochs=1)
    # --resume of the finished sweep ends by itself and moves no run's start or end time.
    times = {r.info.run_id: (r.info.start_time, r.info.end_time, r.info.status)
             for r in _runs(pg_server.uri, "shared")}
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    kill_new_ray_processes(before)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {r.info.run_id: (r.info.start_time, r.info.end_time, r.info.status)
            for r in _runs(pg_server.uri, "shared")} == times
    printed = "".join((tmp_path / f"{n}.log").read_text() for n in "ab")
    printed += resumed.stdout + resumed.stderr + bare.stdout + bare.stderr
    printed += again.stdout + again.stderr
    assert PASSWORD not in printed
    for file in (tmp_path / f"st_{winner}").rglob("*"):
        if file.is_file():
            assert PASSWORD.encode() not in file.read_bytes(), file
    config = json.loads((tmp_path / f"st_{winner}" / "shared" / "sweep.json").read_text())
    assert config["tracking.uri"] == f"http://***@{host}"


_OPENER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from debias import tracking_writer as tw
    from debias.tracking import open_store
    uri, name, journal = sys.argv[1:4]
    open_store(uri)
    writer = tw.TrackingWriter(uri, name, journal, retry_initial_s=0.1, retry_max_s=1.0)
    writer.submit(tw.ensure_run(("parent", name), name=name, tags={"who": name}))
    writer.submit(tw.log_metrics(("parent", name), {"m": 1.0}, step=1))
    writer.submit(tw.set_terminated(("parent", name), "FINISHED"))
    left = writer.close(60)
    print(json.dumps({"left": left, "dropped": writer.status().dropped}))
''')

_FOREIGN = textwrap.dedent('''
    import sys
    from mlflow.tracking import MlflowClient
    try:  # MLflow's own first open, with no lock of ours: it may lose the race
        MlflowClient(tracking_uri=sys.argv[1]).search_experiments()
    except Exception as exc:
        print(type(exc).__name__)
''')


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_programs_opening_a_new_store_at_once_lose_no_write(
        tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    """Issue #2: three sweeps' writers (the sweep's own store opening, then its journaled
    writer) and MLflow itself opening one brand-new store at the same moment: every writer
    writes its run, none is dropped (MLflow's migrations race; the sweep creates a new
    sqlite store under its lock and retries what races)."""
    if store == "sqlite":
        uri = f"sqlite:///{tmp_path / 'new.db'}"
    else:
        uri = request.getfixturevalue("postgres").database("fresh")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, uri, f"w{i}",
                               str(tmp_path / f"journal{i}")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    procs.append(subprocess.Popen([sys.executable, "-c", _FOREIGN, uri], cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs[:3], outs[:3], strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == {"left": 0, "dropped": 0}, err
    client = MlflowClient(tracking_uri=uri)
    for i in range(3):
        exp = client.get_experiment_by_name(f"w{i}")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED" and run.data.metrics == {"m": 1.0}


def test_a_full_disk_stops_the_sweep_with_the_space_needed_and_resume_finishes(
        tmp_path: Path) -> None:
    """Issue #3: storage on a small tmpfs that fills mid-sweep: the sweep stops (no
    traceback of ours), exit 1 with the folder, the space to free
    and the --resume command; the parent is KILLED, no run RUNNING. Once there is space,
    --resume puts back Tune's state files that the full disk cut short (from the last good
    copy) and finishes every run exactly once."""
    mount = tmp_path / "small"
    mount.mkdir()
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({probe.stderr.strip()}): needs root")
    path = write_sweep(tmp_path, _sweep(tmp_path, name="full", storage=str(mount)))
    db = tmp_path / "mlflow.db"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))
    before = _ray_pids()
    try:
        first = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path),
                                "--num-cpus", "2"], cwd=tmp_path, env=_env(ray_tmp),
                               capture_output=True, text=True, timeout=600)
        kill_new_ray_processes(before)
        text = first.stdout + first.stderr
        assert first.returncode == 1, text[-3000:]
        # Ray logs the writes that failed (its workers' too); the driver itself ends with
        # its message, not a traceback (before: Tune's `EOFError: Ran out of input`, read
        # back from an error file cut short, ended the driver).
        assert _ours(text)[-1].startswith("error: the disk holding storage"), text[-3000:]
        message = next(line for line in text.splitlines()
                       if line.startswith("error: the disk holding storage"))
        assert str(mount) in message and "free at least" in message
        assert re.search(r"free at least \d+ MB", message) and "--resume" in message
        runs = _runs(f"sqlite:///{db}", "full")
        (parent,) = [r for r in runs if r.data.tags.get("debias.role") == "parent"]
        assert parent.info.status == "KILLED" and "full" in parent.data.tags["note"]
        assert not [r for r in runs if r.info.status == "RUNNING"]

        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed = subprocess.run([sys.executable, str(REPO / "launch.py"), str(path),
                                  "--num-cpus", "2", "--resume"], cwd=tmp_path,
                                 env=_env(ray_tmp), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        kill_new_ray_processes(before)
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    check_sweep_runs(f"sqlite:///{db}", "full", {"Odd": "Background"}, n_search=2, seeds=[0],
                     epochs=1)


def test_a_driver_killed_while_ray_starts_leaves_no_ray_process(tmp_path: Path) -> None:
    """Issue #9: SIGKILL while `ray.init` was still starting left Ray's dashboard and
    runtime-env agents alive for a minute (the watchdog started after `ray.init` returned);
    it is armed before, and finds the session folder from the processes it marked."""
    from tests.test_faults import _pids_with_env

    path = write_sweep(tmp_path, _sweep(tmp_path, name="early"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    before = _ray_pids()
    try:
        driver = _start(tmp_path, path, ray_tmp, "early.log")
        def marked() -> list[int]:  # what the driver started (its marker in their env)
            out = []
            for pid in _pids_with_env("RAY_TMPDIR", str(ray_tmp)):
                with contextlib.suppress(OSError):
                    if b"DEBIAS_WATCHDOG=" in Path(f"/proc/{pid}/environ").read_bytes():
                        out.append(pid)
            return out

        # Ray's first processes (the GCS) are up: ray.init has not returned yet.
        wait_for(lambda: marked() or driver.poll() is not None, 120, "Ray to start")
        assert driver.poll() is None, (tmp_path / "early.log").read_text()[-3000:]
        assert not (tmp_path / "results" / "early" / "tune").exists()  # no trial yet
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        wait_for(lambda: not [p for p in _pids_with_env("RAY_TMPDIR", str(ray_tmp))
                              if p != driver.pid], 30, "the killed driver's Ray processes to go")
    finally:
        kill_new_ray_processes(before)
        shutil.rmtree(ray_tmp, ignore_errors=True)
