"""The tracking writer against a real ``mlflow server`` that dies and comes back.

What a sweep needs from it: submit never blocks and never raises, whatever the server does;
what cannot be written goes to a bounded journal and is written, in order and once, when the
server answers again, by the same writer or by a later ``replay`` in another process.
Every wait here is on a condition with a deadline; the only time bound is per ``submit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient

from debias import tracking_writer as tw
from debias.files import LockHeld

REPO = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).parent / "mlflow"
#: A bound, not a comparison: submit only serialises and queues.
SUBMIT_BOUND_S = 0.5
#: Fast retries so a test sees the writer recover within a second of the server's return.
FAST = {"retry_initial_s": 0.05, "retry_max_s": 0.5, "request_timeout_s": 5.0}


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a sqlite file (or ``backend``, e.g. a PostgreSQL database), in its
    own process group, killed like a crash."""

    def __init__(self, root: Path, backend: str | None = None) -> None:
        self.root = root
        self.backend = backend or f"sqlite:///{root / 'mlflow.db'}"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 90.0) -> None:
        assert self.proc is None
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.starts += 1
        log = open(self.root / f"server{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri", self.backend,
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                text = (self.root / f"server{self.starts}.log").read_text(errors="replace")
                self.proc = None
                pytest.fail(f"mlflow server exited at start:\n{text[-3000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("mlflow server did not answer /health")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole group (the server and its uvicorn worker): an abrupt outage."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return True
            return False

        wait_for(refused, 30, "the killed server's port to close")

    def ensure_running(self) -> None:
        if self.proc is None:
            self.start()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


# ---------------------------------------------------------------------------------- reading


def runs_by_key(uri: str, experiment: str) -> dict[str, list[Any]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    out: dict[str, list[Any]] = {}
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(run.data.tags.get(tw.KEY_TAG, "?"), []).append(run)
    return out


def snapshot(uri: str, experiment: str) -> dict[str, Any]:
    """Everything a duplicate write would change: runs per key, their status, params, tags
    and every metric row (duplicates included), artifact names and sizes."""
    client = MlflowClient(uri)
    out: dict[str, Any] = {}
    for key, runs in runs_by_key(uri, experiment).items():
        entries = []
        for run in runs:
            metrics = {name: sorted((m.step, m.timestamp, m.value)
                                    for m in client.get_metric_history(run.info.run_id, name))
                       for name in run.data.metrics}
            tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
            artifacts = sorted((f.path, f.file_size) for f in _walk(client, run.info.run_id))
            entries.append((run.info.status, run.info.end_time, dict(run.data.params), tags,
                            metrics, artifacts))
        out[key] = entries
    return out


def _walk(client: MlflowClient, run_id: str, path: str | None = None) -> list[Any]:
    found = []
    for f in client.list_artifacts(run_id, path):
        found += _walk(client, run_id, f.path) if f.is_dir else [f]
    return found


def history(uri: str, run: Any, name: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, name))


def key_str(key: tuple[str, ...]) -> str:
    return json.dumps(list(key), separators=(",", ":"))


P = tw.parent_key("erm/Odd")
A = tw.trial_key("erm/Odd", "search", "a_00000")
B = tw.trial_key("erm/Odd", "search", "a_00001")
C = tw.trial_key("erm/Odd", "seeds", "b_00000")


def epoch(key: tuple[str, ...], step: int) -> tw.Op:
    return tw.log_metrics(key, {"train/loss": 1.0 / step, "val/avg_acc": 0.5 + step / 100},
                          step=step, timestamp_ms=1_700_000_000_000 + step)


def replay_in_new_process(uri: str, experiment: str, journal: Path) -> int:
    code = ("import sys; from debias.tracking_writer import replay; "
            "print(replay(sys.argv[1], sys.argv[2], sys.argv[3]))")
    done = subprocess.run([sys.executable, "-c", code, uri, experiment, str(journal)],
                          cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- tests


def test_outage_neither_blocks_nor_raises_and_everything_lands_once(
        server: MlflowServer, tmp_path: Path) -> None:
    server.ensure_running()
    exp, journal = "outage", tmp_path / "journal"
    art = tmp_path / "overlays"
    (art / "sub").mkdir(parents=True)
    (art / "a.png").write_bytes(b"x" * 100)
    (art / "sub" / "b.png").write_bytes(b"y" * 50)
    writer = tw.TrackingWriter(server.uri, exp, journal, **FAST)
    try:
        writer.submit(tw.ensure_run(P, name="erm/Odd", tags={"debias.role": "parent"}))
        writer.submit(tw.ensure_run(A, name="search-a_00000", parent=P,
                                    tags={"phase": "search"}, params={"train.lr": 0.01}))
        for step in (1, 2, 3):
            writer.submit(epoch(A, step))
        writer.submit(tw.log_artifact(A, art, "overlays"))
        assert writer.flush(60)
        assert len(runs_by_key(server.uri, exp)[key_str(A)]) == 1

        server.kill()
        outage = [epoch(A, s) for s in range(4, 11)]
        outage += [tw.ensure_run(B, name="search-a_00001", parent=P, params={"train.lr": 0.1}),
                   *(epoch(B, s) for s in range(1, 6)),
                   tw.set_terminated(A, "FINISHED"), tw.set_tags(B, {"retried": "true"}),
                   tw.set_terminated(B, "FAILED"), tw.log_artifact(A, art, "overlays")]
        applied_before = writer.status().applied
        pendings = []
        for op in outage:
            start = time.perf_counter()
            writer.submit(op)
            assert time.perf_counter() - start < SUBMIT_BOUND_S
            pendings.append(writer.pending())
        # Nothing can be written while the server is dead: every op stays pending.
        assert pendings == list(range(1, len(outage) + 1))
        wait_for(lambda: writer.status().journaled == len(outage), 60,
                 "every op written during the outage to reach the journal")
        assert tw.journal_pending(journal) == len(outage)
        status = writer.status()
        assert status.down_since is not None and status.applied == applied_before
        assert status.dropped == 0 and not writer.flush(0.2)

        server.start()
        assert writer.flush(90)
        assert writer.pending() == 0 and writer.dropped == []
        assert tw.journal_pending(journal) == 0
        assert writer.status().down_since is None
    finally:
        writer.close()

    runs = runs_by_key(server.uri, exp)
    assert sorted(runs) == sorted(key_str(k) for k in (P, A, B))
    assert all(len(found) == 1 for found in runs.values()), runs
    run_p, run_a, run_b = runs[key_str(P)][0], runs[key_str(A)][0], runs[key_str(B)][0]
    for name in ("train/loss", "val/avg_acc"):
        assert history(server.uri, run_a, name) == list(range(1, 11))
        assert history(server.uri, run_b, name) == list(range(1, 6))
    assert (run_p.info.status, run_a.info.status, run_b.info.status) == (
        "RUNNING", "FINISHED", "FAILED")
    assert run_b.data.tags["mlflow.parentRunId"] == run_p.info.run_id
    assert run_b.data.tags["retried"] == "true" and run_b.data.params == {"train.lr": "0.1"}
    client = MlflowClient(server.uri)
    assert sorted((f.path, f.file_size) for f in _walk(client, run_a.info.run_id)) == [
        ("overlays/a.png", 100), ("overlays/sub/b.png", 50)]


def test_close_with_ops_pending_then_replay_elsewhere_writes_everything_once(
        server: MlflowServer, tmp_path: Path) -> None:
    server.ensure_running()
    exp, journal = "replay", tmp_path / "journal"
    report = tmp_path / "report.csv"
    report.write_text("a,b\n1,2\n")
    writer = tw.TrackingWriter(server.uri, exp, journal, **FAST)
    writer.submit(tw.ensure_run(P, name="erm/Odd"))
    writer.submit(tw.ensure_run(A, name="search-a_00000", parent=P, params={"seed": 0}))
    writer.submit(epoch(A, 1))
    assert writer.flush(60)

    server.kill()
    ops = [*(epoch(A, s) for s in (2, 3)), tw.set_terminated(A, "FINISHED", end_time_ms=123),
           tw.ensure_run(C, name="seeds-b_00000", parent=P, params={"seed": 1}),
           epoch(C, 1), tw.log_artifact(C, report), tw.set_terminated(C, end_time_ms=456),
           tw.ensure_run(P, name="erm/Odd", reopen=True), tw.set_tags(P, {"best_run_id": "x"})]
    for op in ops:
        writer.submit(op)
    assert writer.close(timeout_s=1.0) == len(ops)
    assert tw.journal_pending(journal) == len(ops)
    saved = (journal / "journal.jsonl").read_bytes()

    server.start()
    assert replay_in_new_process(server.uri, exp, journal) == len(ops)
    assert tw.journal_pending(journal) == 0
    first = snapshot(server.uri, exp)
    runs = runs_by_key(server.uri, exp)
    assert all(len(found) == 1 for found in runs.values())
    assert history(server.uri, runs[key_str(A)][0], "train/loss") == [1, 2, 3]
    assert runs[key_str(C)][0].info.status == "FINISHED"
    assert runs[key_str(P)][0].data.tags["best_run_id"] == "x"
    stored = list(server.artifacts.rglob("report.csv"))
    assert len(stored) == 1
    stamp = stored[0].stat().st_mtime_ns

    # Replaying again finds nothing to do...
    assert tw.replay(server.uri, exp, journal) == 0
    # ...and writing the very same ops once more (a crash after MLflow took them but before
    # the journal forgot them) changes nothing: no run, metric row or upload twice.
    (journal / "journal.jsonl").write_bytes(saved)
    assert replay_in_new_process(server.uri, exp, journal) == len(ops)
    assert snapshot(server.uri, exp) == first
    assert stored[0].stat().st_mtime_ns == stamp


def test_an_op_the_server_refuses_is_dropped_and_later_ops_still_land(
        server: MlflowServer, tmp_path: Path) -> None:
    server.ensure_running()
    exp, journal = "refused", tmp_path / "journal"
    with tw.TrackingWriter(server.uri, exp, journal, **FAST) as writer:
        writer.submit(tw.ensure_run(A, name="a", params={"train.lr": "0.1"}))
        writer.submit(tw.log_params(A, {"train.lr": "0.2"}))        # 400: params never change
        writer.submit(epoch(("trial", "nobody", "made", "this"), 1))  # no such run
        writer.submit(tw.log_params(A, {"train.lr": "0.1", "extra": "1"}))  # same value: fine
        writer.submit(epoch(A, 1))
        writer.submit(tw.set_terminated(A))
        assert writer.flush(60)
        status = writer.status()
        assert (status.dropped, status.journaled, status.down_since) == (2, 0, None)
        reasons = [d.reason for d in writer.dropped]
        assert "Changing param values is not allowed" in reasons[0]
        assert "no MLflow run has key" in reasons[1]
        assert [d.op["op"] for d in writer.dropped] == ["log_params", "log_metrics"]
    recorded = (journal / "dropped.jsonl").read_text().splitlines()
    assert [json.loads(line)["op"]["op"] for line in recorded] == ["log_params", "log_metrics"]
    run = runs_by_key(server.uri, exp)[key_str(A)][0]
    assert run.data.params == {"train.lr": "0.1", "extra": "1"}
    assert run.info.status == "FINISHED" and history(server.uri, run, "train/loss") == [1]


def test_the_journal_is_bounded_and_says_so_once(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="debias.tracking_writer")
    journal = tmp_path / "journal"
    bound = 4096
    writer = tw.TrackingWriter(f"http://127.0.0.1:{free_port()}", "bounded", journal,
                               max_journal_bytes=bound, **FAST)
    try:
        writer.submit(tw.ensure_run(A, name="a"))
        for step in range(1, 200):
            start = time.perf_counter()
            writer.submit(epoch(A, step))
            assert time.perf_counter() - start < SUBMIT_BOUND_S

        def settled() -> bool:
            s = writer.status()
            return s.queued == 0 and s.in_flight == 0 and s.journaled + s.lost == 200

        wait_for(settled, 60, "every op to be journaled or counted lost")
        status = writer.status()
        assert status.lost > 0 and status.journaled > 0 and status.applied == 0
        assert (journal / "journal.jsonl").stat().st_size <= bound
        assert tw.journal_pending(journal) == status.journaled
        full = [r for r in caplog.records if "is full" in r.getMessage()]
        assert len(full) == 1
    finally:
        left = writer.close(timeout_s=0.5)
    assert left == tw.journal_pending(journal) > 0


def test_one_process_owns_a_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tw.TrackingWriter(uri, "lock", journal):
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            tw.TrackingWriter(uri, "lock", journal)
        (journal / "journal.jsonl").write_text("")
        with pytest.raises(LockHeld):
            tw.replay(uri, "lock", journal)
    with tw.TrackingWriter(uri, "lock", journal):  # released by close
        pass


@pytest.mark.parametrize("store", ["sqlite", "file"])
def test_local_store_replay_is_idempotent_and_skips_a_torn_last_line(
        tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default store (and the deprecated file store, which keeps identical metric rows
    where SQL drops them): the same journal replayed twice, by fresh replays with no cached
    run ids, writes each run and metric row once; a line cut by a crash is set aside."""
    if store == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (tmp_path / "mlruns").as_uri()
    else:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp, journal = "local", tmp_path / "journal"
    ops = [tw.ensure_run(P, name="erm/Odd"),
           tw.ensure_run(A, name="a", parent=P, params={"seed": 0}),
           *(epoch(A, s) for s in (1, 2, 3)),
           tw.log_metrics(A, {"test/acc": 0.9}, step=3, timestamp_ms=5),
           tw.log_metrics(A, {"test/acc": 0.9}, step=3, timestamp_ms=5),  # an identical row
           tw.set_terminated(A, end_time_ms=99)]
    lines = "".join(json.dumps(op) + "\n" for op in ops)
    journal.mkdir()
    (journal / "journal.jsonl").write_text(lines + '{"v": 1, "op": "log_met')
    assert tw.journal_pending(journal) == len(ops)
    assert tw.replay(uri, exp, journal) == len(ops)
    first = snapshot(uri, exp)
    assert first[key_str(A)][0][4]["train/loss"] == [
        (s, 1_700_000_000_000 + s, 1.0 / s) for s in (1, 2, 3)]
    assert first[key_str(A)][0][4]["test/acc"] == [(3, 5, 0.9)]
    assert "log_met" in (journal / "dropped.jsonl").read_text()
    (journal / "journal.jsonl").write_text(lines)
    assert tw.replay(uri, exp, journal) == len(ops)
    assert snapshot(uri, exp) == first
    assert tw.replay(uri, exp, journal) == 0


def test_runs_made_before_keys_are_adopted_not_duplicated(tmp_path: Path) -> None:
    """A sweep started before runs carried a key: ``match`` finds its parent and trial runs
    by the tags they have, gives them the key, and writes to them."""
    uri, journal = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "journal"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("old")
    parent = client.create_run(exp_id, run_name="erm/Odd", tags={"debias.role": "parent"})
    trial = client.create_run(exp_id, run_name="search-a_00000", tags={
        "mlflow.parentRunId": parent.info.run_id, "phase": "search", "ray_trial_id": "a_00000"})
    with tw.TrackingWriter(uri, "old", journal) as writer:
        writer.submit(tw.ensure_run(P, name="erm/Odd", reopen=True,
                                    match={"debias.role": "parent", "mlflow.runName": "erm/Odd"}))
        writer.submit(tw.ensure_run(A, name="search-a_00000", parent=P,
                                    match={"phase": "search", "ray_trial_id": "a_00000"}))
        writer.submit(epoch(A, 1))
        assert writer.flush(60) and writer.dropped == []
        assert writer.run_id(A) == trial.info.run_id
    runs = runs_by_key(uri, "old")
    assert sorted(runs) == sorted(key_str(k) for k in (P, A))
    assert [r.info.run_id for r in runs[key_str(P)]] == [parent.info.run_id]
    assert history(uri, runs[key_str(A)][0], "train/loss") == [1]


class _FakeServer:
    """An HTTP server answering every request with one status (or not at all)."""

    def __init__(self, status: int, hang_s: float = 0.0) -> None:
        fake = self
        self.requests = 0
        self.status = status

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                fake.requests += 1
                if hang_s:
                    time.sleep(hang_s)
                body = json.dumps({"error_code": "INTERNAL_ERROR", "message": "boom"}).encode()
                try:
                    self.send_response(fake.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client timed out and left: that is the point
                    pass

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status,hang_s", [(503, 0.0), (502, 0.0), (200, 3.0)],
                         ids=["503", "502", "timeout"])
def test_unavailable_and_timeouts_are_retried_never_dropped(tmp_path: Path, status: int,
                                                            hang_s: float) -> None:
    fake = _FakeServer(status, hang_s)
    writer = tw.TrackingWriter(fake.uri, "fake", tmp_path / "journal", retry_initial_s=0.05,
                               retry_max_s=0.1, request_timeout_s=0.5)
    try:
        writer.submit(tw.ensure_run(A, name="a"))
        writer.submit(epoch(A, 1))
        wait_for(lambda: fake.requests >= 3, 30, "the writer to keep retrying")
        status_now = writer.status()
        assert status_now.dropped == 0 and status_now.down_since is not None
        assert status_now.journaled == 2 and tw.journal_pending(tmp_path / "journal") == 2
    finally:
        assert writer.close(timeout_s=0.2) == 2
        fake.stop()


def test_an_op_that_keeps_failing_with_500_is_given_up(tmp_path: Path) -> None:
    fake = _FakeServer(500)
    writer = tw.TrackingWriter(fake.uri, "fake", tmp_path / "journal", retry_initial_s=0.02,
                               retry_max_s=0.05, request_timeout_s=2.0, give_up_after=3)
    try:
        writer.submit(tw.ensure_run(A, name="a"))
        wait_for(lambda: writer.status().dropped == 1, 30, "the op to be given up")
        assert "gave up after 3 server errors" in writer.dropped[0].reason
        assert writer.pending() == 0 and fake.requests == 3
    finally:
        writer.close(timeout_s=0.2)
        fake.stop()


# ------------------------------------------------------------------ merged writes, the link


class _CountingProxy:
    """Forwards every request to a real MLflow server and records each (method, path, status,
    JSON body); with ``down`` set it answers 503 itself, as a server that is away would."""

    def __init__(self, upstream: str) -> None:
        proxy = self
        self.down = False
        self.calls: list[tuple[str, str, int, Any]] = []
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                status, data = 503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}'
                if not proxy.down:
                    status, data = self._upstream(body)
                    with contextlib.suppress(ValueError):
                        body = json.loads(body) if body else None
                    with proxy.lock:
                        proxy.calls.append((self.command, self.path.split("?")[0], status, body))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _upstream(self, body: bytes) -> tuple[int, bytes]:
                request = urllib.request.Request(
                    upstream + self.path, data=body if self.command != "GET" else None,
                    method=self.command, headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        return answer.status, answer.read()
                except urllib.error.HTTPError as err:
                    return err.code, err.read()

            do_GET = do_POST = do_PUT = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def log_batches(self) -> list[tuple[int, Any]]:
        """(status, request body) of each log-batch call that reached the server."""
        with self.lock:
            return [(status, body) for _m, path, status, body in self.calls
                    if path.endswith("/runs/log-batch")]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def proxy(server: MlflowServer) -> Iterator[_CountingProxy]:
    server.ensure_running()
    counting = _CountingProxy(server.uri)
    try:
        yield counting
    finally:
        counting.stop()


def test_ops_are_grouped_by_run_up_to_one_calls_limits() -> None:
    """What one attempt writes: consecutive metric/param/tag ops of one run; another run's
    op, an ensure_run or a param's second value starts a new group."""
    def lines(*ops: tw.Op) -> list[bytes]:
        return [json.dumps(op).encode() for op in ops]

    ops = lines(epoch(A, 1), tw.log_params(A, {"x": "1"}), tw.set_tags(A, {"t": "a"}),
                epoch(A, 2), tw.set_tags(A, {"t": "b"}), epoch(B, 1))
    group = tw._front(ops)
    assert len(group.lines) == 5 and group.batch is not None
    assert len(group.batch.metrics) == 4 and group.batch.tags == {"t": "b"}
    assert len(tw._front(ops, one=True).lines) == 1
    assert len(tw._front(lines(tw.ensure_run(A, name="a"), epoch(A, 1))).lines) == 1
    conflict = lines(tw.log_params(A, {"x": "1"}), epoch(A, 1), tw.log_params(A, {"x": "2"}))
    assert len(tw._front(conflict).lines) == 2
    many = lines(*(tw.log_metrics(A, {"m": float(s)}, step=s) for s in range(1500)))
    assert len(tw._front(many).lines) == 1000  # MLflow's 1000 metrics per call


def test_a_drained_journal_becomes_few_log_batch_calls_within_mlflows_limits(
        proxy: _CountingProxy, tmp_path: Path) -> None:
    """1,207 journaled ops (1,200 epochs of one run, then another run's three) reach a real
    server as five log-batch calls, each within MLflow's per-call limits, and all land."""
    exp, journal = "merged", tmp_path / "journal"
    ops = [tw.ensure_run(P, name="erm/Odd"),
           tw.ensure_run(A, name="a", parent=P, params={"train.lr": 0.1}),
           *(epoch(A, s) for s in range(1, 1201)), tw.set_tags(A, {"note": "done"}),
           tw.set_terminated(A), tw.ensure_run(B, name="b", parent=P),
           *(epoch(B, s) for s in (1, 2, 3))]
    journal.mkdir()
    (journal / "journal.jsonl").write_text("".join(json.dumps(op) + "\n" for op in ops))
    assert tw.replay(proxy.uri, exp, journal) == len(ops)
    calls = proxy.log_batches()
    # A's params; A's 2,400 metric rows and its tag in three calls; B's six rows in one.
    assert len(calls) == 5 and all(status == 200 for status, _ in calls)
    for _status, body in calls:
        assert len(body.get("metrics", [])) <= 1000 and len(body.get("params", [])) <= 100
        assert len(body.get("tags", [])) <= 100
    assert [len(body.get("metrics", [])) for _, body in calls] == [0, 1000, 1000, 400, 6]
    runs = runs_by_key(proxy.uri, exp)
    run_a, run_b = runs[key_str(A)][0], runs[key_str(B)][0]
    assert history(proxy.uri, run_a, "val/avg_acc") == list(range(1, 1201))
    assert history(proxy.uri, run_b, "train/loss") == [1, 2, 3]
    assert run_a.data.tags["note"] == "done" and run_a.info.status == "FINISHED"


def test_the_link_goes_down_and_up_and_the_outage_drains_as_one_call(
        proxy: _CountingProxy, tmp_path: Path) -> None:
    writer = tw.TrackingWriter(proxy.uri, "link", tmp_path / "journal", **FAST)
    try:
        assert writer.link is tw.Link.UP
        writer.submit(tw.ensure_run(A, name="a"))
        assert writer.flush(60) and writer.link is tw.Link.UP
        proxy.down = True
        for step in range(1, 31):
            writer.submit(epoch(A, step))
        wait_for(lambda: writer.status().journaled == 30, 60, "the epochs to be journaled")
        assert writer.link is tw.Link.DOWN and writer.status().link == "down"
        before = len(proxy.log_batches())
        proxy.down = False
        assert writer.flush(60)
        assert writer.link is tw.Link.UP and writer.status().down_since is None
        calls = proxy.log_batches()[before:]
        assert [(status, len(body["metrics"])) for status, body in calls] == [(200, 60)]
    finally:
        writer.close(timeout_s=5)
    assert writer.link is tw.Link.CLOSING
    writer.submit(epoch(A, 31))  # after close: counted lost, never written
    assert writer.status().lost == 1
    run = runs_by_key(proxy.uri, "link")[key_str(A)][0]
    assert history(proxy.uri, run, "train/loss") == list(range(1, 31))


def test_a_merged_call_mlflow_refuses_is_retried_op_by_op(proxy: _CountingProxy,
                                                          tmp_path: Path) -> None:
    """A param's second value inside a merged call: MLflow refuses the call; the writer
    writes its ops one at a time, drops only that one, and everything else lands."""
    writer = tw.TrackingWriter(proxy.uri, "split", tmp_path / "journal", **FAST)
    try:
        writer.submit(tw.ensure_run(A, name="a", params={"train.lr": "0.1"}))
        assert writer.flush(60)
        proxy.down = True  # so the four ops wait in the journal and drain as one group
        for op in (epoch(A, 1), tw.log_params(A, {"train.lr": "0.2"}), epoch(A, 2),
                   tw.set_tags(A, {"x": "1"})):
            writer.submit(op)
        wait_for(lambda: writer.status().journaled == 4, 60, "the ops to be journaled")
        before = len(proxy.log_batches())
        proxy.down = False
        assert writer.flush(60)
        statuses = [status for status, _ in proxy.log_batches()[before:]]
        assert statuses == [400, 200, 400, 200, 200]  # merged, then one by one
        assert [d.op["op"] for d in writer.dropped] == ["log_params"]
        assert "Changing param values is not allowed" in writer.dropped[0].reason
        assert writer.status().applied == 1 + 3 and writer.link is tw.Link.UP
    finally:
        writer.close(timeout_s=5)
    run = runs_by_key(proxy.uri, "split")[key_str(A)][0]
    assert history(proxy.uri, run, "train/loss") == [1, 2]
    assert run.data.params == {"train.lr": "0.1"} and run.data.tags["x"] == "1"
