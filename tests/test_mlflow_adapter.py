"""The MLflow adapter (debias/mlflow_adapter.py): everything the tracking writer asks of
MLflow, checked against a real sqlite store and a real ``mlflow server``.

These tests are what a new MLflow release must pass for the writer to keep working; they
pass unchanged with MLflow 2.16.0 (the oldest ``pyproject.toml`` admits, with the SQLAlchemy
< 2.1 it needs) and with the installed 3.x.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from debias import mlflow_adapter as ma
from tests.test_tracking_writer import (  # noqa: F401 - server: the module's mlflow server
    MlflowServer,
    _FakeServer,
    free_port,
    server,
)


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ma.Backend, str | None]:
    """A backend, and the artifact location its experiments get (the server's own: None)."""
    if request.param == "sqlite":
        return (ma.connect(f"sqlite:///{tmp_path / 'mlflow.db'}", timeout_s=10),
                (tmp_path / "mlartifacts").as_uri())
    srv: MlflowServer = request.getfixturevalue("server")
    srv.ensure_running()
    return ma.connect(srv.uri, timeout_s=10), None


# ---------------------------------------------------------------------------------- limits


def test_the_limits_are_mlflows() -> None:
    """The per-call limits the writer merges up to are the ones MLflow enforces."""
    from mlflow.utils import validation

    assert ma.Limits(
        metrics=validation.MAX_METRICS_PER_BATCH, params=validation.MAX_PARAMS_TAGS_PER_BATCH,
        tags=validation.MAX_PARAMS_TAGS_PER_BATCH, entities=validation.MAX_ENTITIES_PER_BATCH,
        request_bytes=validation.MAX_BATCH_LOG_REQUEST_SIZE) == ma.LIMITS
    assert ma.MAX_PARAM_VALUE == validation.MAX_PARAM_VAL_LENGTH


def test_a_batch_merges_like_one_op_after_another_within_the_limits() -> None:
    batch = ma.Batch()
    assert batch.add(metrics=[["m", 1.0, 5, 1], ["m", 1.0, 5, 1]], params={"p": "1"},
                     tags={"t": "a"})
    assert batch.add(metrics=[["m", 1.0, 5, 1]], params={"p": "1"}, tags={"t": "b"})
    assert list(batch.metrics) == [("m", 1.0, 5, 1)]  # an identical row once
    assert batch.params == {"p": "1"} and batch.tags == {"t": "b"}  # the last tag wins
    assert not batch.add(params={"p": "2"})  # a second value: a call of its own
    assert batch.params == {"p": "1"}

    full = ma.Batch()
    assert full.add(params={f"p{i}": "v" for i in range(100)},
                    tags={f"t{i}": "v" for i in range(100)},
                    metrics=[[f"m{i}", 0.0, 0, 0] for i in range(800)])
    assert len(full) == 1000
    assert not full.add(metrics=[["one_more", 0.0, 0, 0]])  # 1000 entities per call
    assert full.add(tags={"t0": "w"})  # overwriting a tag adds no entity


def test_batches_split_what_one_call_cannot_hold_and_each_request_fits() -> None:
    rows = [[f"m{i % 7}", float(i), i, i] for i in range(2500)]
    assert [len(b.metrics) for b in ma.batches(rows)] == [1000, 1000, 500]
    big = ma.batches(params={f"p{i}": "é" * ma.MAX_PARAM_VALUE for i in range(100)},
                     tags={f"t{i}": "x" * ma.MAX_TAG_VALUE for i in range(100)})
    parts = list(big)
    assert len(parts) > 1 and sum(len(p.params) for p in parts) == 100
    for part in parts:  # the request body as the REST backend sends it
        body = json.dumps({"run_id": "r" * 32, "metrics": [],
                           "params": [{"key": k, "value": v} for k, v in part.params.items()],
                           "tags": [{"key": k, "value": v} for k, v in part.tags.items()]})
        assert len(body) <= ma.LIMITS.request_bytes
    assert list(ma.batches()) == []


# ---------------------------------------------------------------------------------- backends


def test_a_backend_does_what_the_writer_asks(store: tuple[ma.Backend, str | None],
                                            tmp_path: Path) -> None:
    """The same answers from the public client (sqlite) and the REST API (a server)."""
    backend, artifacts = store
    assert backend.find_experiment("adapter") is None
    created = backend.create_experiment("adapter", artifacts)
    found = backend.find_experiment("adapter")
    assert found == ma.ExperimentRecord(created, "active")
    with pytest.raises(Exception) as again:  # what the writer treats as "someone was first"
        backend.create_experiment("adapter", artifacts)
    assert ma.classify(again.value) == ma.REFUSED

    first = backend.create_run(created, name="first", start_time=1_000,
                               tags={"debias.key_id": "k1", "mlflow.user": "ann"})
    second = backend.create_run(created, name="second", start_time=2_000,
                                tags={"debias.key_id": "k1"})
    assert first.status == "RUNNING" and first.lifecycle_stage == "active"
    assert first.tags["debias.key_id"] == "k1"
    assert [r.run_id for r in backend.search_runs(created, "tags.`debias.key_id` = 'k1'", 10)] \
        == [first.run_id, second.run_id]  # oldest first
    assert backend.search_runs(created, "tags.`debias.key_id` = 'none'", 10) == []

    batch = ma.Batch()
    assert batch.add(metrics=[["loss", 0.5, 10, 1], ["loss", 0.25, 11, 2],
                              ["big", math.inf, 12, 2]],
                     params={"lr": "0.1"}, tags={"note": "n" * ma.MAX_TAG_VALUE})
    backend.log_batch(first.run_id, batch)
    backend.log_batch(first.run_id, batch)  # again: nothing twice
    run = backend.get_run(first.run_id)
    assert run.params == {"lr": "0.1"} and run.tags["note"].startswith("nnn")
    assert sorted(backend.metric_history(first.run_id, "loss")) == [
        ("loss", 0.25, 11, 2), ("loss", 0.5, 10, 1)]
    (big,) = backend.metric_history(first.run_id, "big")  # SQL stores clamp an infinity
    assert big[0] == "big" and big[1] >= sys.float_info.max and big[2:] == (12, 2)
    conflict = ma.Batch()
    conflict.add(params={"lr": "0.2"})
    with pytest.raises(Exception) as refused:
        backend.log_batch(first.run_id, conflict)
    assert ma.classify(refused.value) == ma.REFUSED
    assert "Changing param values is not allowed" in str(refused.value)

    backend.set_status(first.run_id, "FINISHED", 5_000)
    assert backend.get_run(first.run_id).status == "FINISHED"
    backend.set_status(first.run_id, "RUNNING", None)
    assert backend.get_run(first.run_id).status == "RUNNING"
    with pytest.raises(Exception) as missing:
        backend.get_run("0" * 32)
    assert ma.classify(missing.value) == ma.REFUSED

    (tmp_path / "a.txt").write_text("hello")
    assert backend.artifact_sizes(first.run_id, "plots") == {}
    backend.upload_artifact(first.run_id, tmp_path / "a.txt", "plots")
    backend.upload_artifact(first.run_id, tmp_path / "a.txt", None)
    assert backend.artifact_sizes(first.run_id, "plots") == {"a.txt": 5}
    assert backend.artifact_sizes(first.run_id, None) == {"a.txt": 5}  # not the folder

    # Experiment tags (a sweep's claim): set, read, replaced, deleted.
    backend.set_experiment_tag(created, "debias.claim.x", '{"pid": 1}')
    backend.set_experiment_tag(created, "debias.claim.x", '{"pid": 2}')
    assert backend.experiment_tags(created)["debias.claim.x"] == '{"pid": 2}'
    backend.delete_experiment_tag(created, "debias.claim.x")
    assert "debias.claim.x" not in backend.experiment_tags(created)


def test_the_rest_backend_uses_mlflows_documented_rest_api(
        request: pytest.FixtureRequest) -> None:
    """What the REST backend wrote is what MLflow's own client reads back."""
    from mlflow.tracking import MlflowClient

    srv: MlflowServer = request.getfixturevalue("server")
    srv.ensure_running()
    backend = ma.connect(srv.uri, timeout_s=10)
    exp = backend.create_experiment("rest_vs_client", None)
    run = backend.create_run(exp, name="r", start_time=1_000, tags={"k": "v"})
    batch = ma.Batch()
    batch.add(metrics=[["acc", 0.75, 7, 3]], params={"seed": "0"}, tags={"k": "w"})
    backend.log_batch(run.run_id, batch)
    backend.set_status(run.run_id, "KILLED", 9_000)
    seen = MlflowClient(srv.uri).get_run(run.run_id)
    assert seen.info.run_name == "r" and seen.info.start_time == 1_000
    assert (seen.info.status, seen.info.end_time) == ("KILLED", 9_000)
    assert seen.data.params == {"seed": "0"} and seen.data.tags["k"] == "w"
    assert seen.data.metrics == {"acc": 0.75}
    assert seen.info.artifact_uri.startswith("mlflow-artifacts:")  # what the proxy path reads


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("status,outcome", [
    (500, ma.SERVER_ERROR), (502, ma.DOWN), (503, ma.DOWN), (429, ma.DOWN), (408, ma.DOWN),
    (400, ma.REFUSED), (403, ma.REFUSED), (404, ma.REFUSED)])
def test_each_request_is_made_once_and_its_status_classified(
        status: int, outcome: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever MLflow's retry settings say for the process, one request per call."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    fake = _FakeServer(status)
    try:
        with pytest.raises(ma.ServerAnswered) as answered:
            ma.connect(fake.uri, timeout_s=5).find_experiment("e")
        assert answered.value.status == status and fake.requests == 1
        assert ma.classify(answered.value) == outcome
    finally:
        fake.stop()


def test_no_answer_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    hanging = _FakeServer(200, hang_s=3.0)
    try:
        with pytest.raises(Exception) as timed_out:
            ma.connect(hanging.uri, timeout_s=0.5).get_run("r")
        assert ma.classify(timed_out.value) == ma.DOWN and hanging.requests == 1
    finally:
        hanging.stop()
    with pytest.raises(Exception) as refused:
        ma.connect(f"http://127.0.0.1:{free_port()}", timeout_s=5).get_run("r")
    assert ma.classify(refused.value) == ma.DOWN


def test_local_failures_are_classified() -> None:
    from sqlalchemy.exc import OperationalError

    busy = OperationalError("INSERT", {}, Exception("database is locked"))
    assert ma.classify(busy) == ma.DOWN
    assert ma.classify(OSError(28, "No space left on device")) == ma.SERVER_ERROR
    assert ma.classify(ValueError("a bug")) == ma.REFUSED
    try:
        raise RuntimeError("wrapped") from ConnectionResetError()
    except RuntimeError as exc:
        assert ma.classify(exc) == ma.DOWN  # the cause counts
