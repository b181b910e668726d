"""MLflow writes that neither stall nor stop a sweep when the tracking server goes away.

Tune runs its callbacks on the scheduling loop and re-raises their exceptions, so a callback
that talks to MLflow directly either blocks scheduling while MLflow's client retries (minutes,
by default) or, once those retries give up, aborts ``Tuner.fit`` and every running trial. This
module takes MLflow off that path:

- The caller builds small, JSON-serialisable **ops** (:func:`ensure_run`, :func:`log_metrics`,
  :func:`log_params`, :func:`set_tags`, :func:`set_terminated`, :func:`log_artifact`) and
  hands them to :meth:`TrackingWriter.submit`, which only serialises the op and appends it to
  an in-memory queue: no network, no disk, no exception.
- One background thread applies the ops in submission order. Ops name their run by a stable
  **logical key** (e.g. ``("trial", pipeline, phase, ray_trial_id)``), never by MLflow run id,
  because while the server is down the run may not exist yet. A key is stored on its run as
  the tags ``debias.key`` (readable) and ``debias.key_id`` (a hash, the one searched for), so
  a new process finds the run again after a restart; within a process the id is cached.
- Every op is idempotent, so applying one twice (a crash after MLflow wrote it but before the
  journal forgot it, or ``replay`` run twice) writes nothing twice: runs are found by their
  key before one is created, params are logged once, tags and statuses are overwrites, metric
  rows carry their own timestamp and step (MLflow's SQL store drops a row identical in key,
  value, timestamp and step, whether reached directly or through the REST server) and an
  artifact whose name and size already exist is not uploaded again.
- When MLflow does not answer (connection refused or reset, timeout, 5xx, 408, 429, SQLite
  busy), the op and every later one go, in order, to an on-disk **journal**: one JSON line per
  op in ``journal_dir/journal.jsonl``, each appended with a single ``write`` on an
  ``O_APPEND`` descriptor and ``fsync``-ed, bounded by ``max_journal_bytes`` (past it ops are
  counted as lost, with one warning). The thread retries the journal's head with exponential
  backoff and drains the journal in order once MLflow answers; trials keep being scheduled
  meanwhile because nothing here waits on the caller's thread.
- Ops MLflow refuses for good (a 4xx other than 408/429, e.g. a param re-logged with another
  value, or an op for a key no :func:`ensure_run` created) are logged once, recorded in
  :attr:`TrackingWriter.dropped` and in ``journal_dir/dropped.jsonl``, and skipped: retrying
  them cannot help and must not hold up the ops behind them. An op that keeps getting a bare
  500 (the server answers, but fails on this op) is given up after ``give_up_after`` tries.
- :meth:`TrackingWriter.close` journals whatever is still unwritten; :func:`replay` (what
  ``--sync`` runs) and a new :class:`TrackingWriter` on the same folder (what ``--resume``
  does) write it later. One process at a time owns a journal (``journal.lock``, via
  :func:`debias.files.acquire`).

MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, with
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` 2 s: about four minutes; ``MLFLOW_HTTP_REQUEST_TIMEOUT``
120 s per attempt) are environment variables read on every request, so setting them would
change every MLflow client of the process, including the sweep's synchronous lookups, which
rely on them to ride out a short restart. MLflow's lowest layer, ``http_request``, takes the
same settings as arguments that win over the environment; the writer's own REST store and
its artifact uploads pass ``max_retries=0`` and ``timeout=request_timeout_s`` there, so one
attempt fails within seconds and the writer's backoff (which, unlike MLflow's, does not hold
anyone up) does the retrying. Other processes' and clients' settings are left alone.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import mimetypes
import os
import posixpath
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.rest_utils import http_request, verify_rest_response

from debias.files import FileLock, LockHeld, acquire, atomic_output
from debias.redaction import redact, redact_uri, remember_uri

__all__ = [
    "DEFAULT_MAX_JOURNAL_BYTES", "KEY_ID_TAG", "KEY_TAG", "DroppedOp", "LockHeld", "Op",
    "RunKey", "TrackingWriter", "WriterStatus", "default_journal_dir", "ensure_run",
    "journal_pending", "key_id", "log_artifact", "log_metrics", "log_params", "parent_key",
    "replay", "set_tags", "set_terminated", "study_key", "trial_key",
]

log = logging.getLogger("debias.tracking_writer")

#: A run's logical key: a non-empty tuple of strings, unique within the sweep's experiment.
RunKey = tuple[str, ...]
#: An op: a JSON-serialisable dict built by one of this module's constructors.
Op = dict[str, Any]

OP_VERSION = 1
KEY_TAG = "debias.key"
KEY_ID_TAG = "debias.key_id"
JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = "journal.lock"
DROPPED_NAME = "dropped.jsonl"
DEFAULT_MAX_JOURNAL_BYTES = 256 * 2**20
#: ``dropped.jsonl`` is a record for a person, not a queue: it stops growing here.
MAX_DROPPED_FILE_BYTES = 16 * 2**20
#: MLflow's limits (mlflow.utils.validation): values are cut to these, batches split by them.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
METRICS_PER_BATCH = 1000
PARAMS_TAGS_PER_BATCH = 100
#: How many dropped ops are logged one by one before the log only counts them.
_LOG_EACH_DROP = 20

_TERMINAL = ("FINISHED", "FAILED", "KILLED")


# ---------------------------------------------------------------------------------- keys


def parent_key(pipeline: str) -> RunKey:
    """The key of a pipeline's parent run (``target``, or ``method/target`` in a study)."""
    return ("parent", str(pipeline))


def trial_key(pipeline: str, phase: str, trial_id: str) -> RunKey:
    """The key of one Ray trial's run; Ray keeps trial ids across ``Tuner.restore``."""
    return ("trial", str(pipeline), str(phase), str(trial_id))


def study_key() -> RunKey:
    """The key of a study's own parent run (one per experiment)."""
    return ("study",)


def _check_key(key: Sequence[str]) -> list[str]:
    if isinstance(key, str) or not key or not all(isinstance(k, str) for k in key):
        raise TypeError(f"a run key is a non-empty tuple of strings, not {key!r}")
    return list(key)


def _canonical(key: Sequence[str]) -> str:
    return json.dumps(list(key), separators=(",", ":"), ensure_ascii=False)


def key_id(key: Sequence[str]) -> str:
    """The value of the ``debias.key_id`` tag of the run with this key: a hash, so searching
    for it needs no quoting whatever the key holds."""
    return hashlib.sha256(_canonical(key).encode("utf-8")).hexdigest()[:32]


def default_journal_dir(storage: str | Path, sweep_name: str) -> Path:
    """Where a sweep keeps its journal: beside its phases under the sweep's storage, so it
    survives the driver and travels with the results (a dot name no pipeline can have)."""
    return Path(storage) / sweep_name / ".mlflow-journal"


# ---------------------------------------------------------------------------------- ops


def _now_ms() -> int:
    return int(time.time() * 1000)


def _str_map(values: Mapping[str, Any] | None, limit: int) -> dict[str, str]:
    return {str(k): str(v)[:limit] for k, v in (values or {}).items()}


def ensure_run(key: Sequence[str], *, name: str, tags: Mapping[str, Any] | None = None,
               params: Mapping[str, Any] | None = None, parent: Sequence[str] | None = None,
               reopen: bool = False, match: Mapping[str, str] | None = None,
               start_time_ms: int | None = None) -> Op:
    """Find the run with ``key`` (by its ``debias.key_id`` tag), else create it.

    Created: named ``name``, with ``tags`` (plus the key tags, and ``mlflow.parentRunId`` of
    the run keyed ``parent``, which must have been ensured before) and ``params``, starting at
    ``start_time_ms`` (default: now, fixed in the op). Found: params it lacks are logged (one
    with another value is kept as it is, with a warning: params never change), tags that
    differ are set, and with ``reopen`` a run that is no longer RUNNING is set RUNNING again
    (a resumed parent, a retried trial). ``match``: tags that identify a run this writer did
    not create (made before runs carried a key, e.g. ``{"phase": ..., "ray_trial_id": ...}``,
    searched among ``parent``'s children when ``parent`` is given); such a run is adopted by
    giving it the key tags. Values are cut to MLflow's length limits.
    """
    return {"v": OP_VERSION, "op": "ensure_run", "key": _check_key(key), "name": str(name),
            "tags": _str_map(tags, MAX_TAG_VALUE), "params": _str_map(params, MAX_PARAM_VALUE),
            "parent": _check_key(parent) if parent is not None else None,
            "reopen": bool(reopen), "match": _str_map(match, MAX_TAG_VALUE) or None,
            "time_ms": int(start_time_ms) if start_time_ms is not None else _now_ms()}


def log_metrics(key: Sequence[str], metrics: Mapping[str, Any], *, step: int = 0,
                timestamp_ms: int | None = None) -> Op:
    """Log ``metrics`` (name -> number) at ``step`` on the run with ``key``.

    The timestamp is fixed in the op (``timestamp_ms``, default now), so the row MLflow stores
    is the same on every attempt and a repeat is dropped by MLflow as a duplicate. Pass the
    result's own timestamp (Tune's ``result["timestamp"] * 1000``) to make a re-sent epoch
    (after a driver restart) a duplicate too. Values that are not numbers, booleans and NaN
    are left out (MLflow's REST API has no portable NaN).
    """
    stamp = int(timestamp_ms) if timestamp_ms is not None else _now_ms()
    rows = []
    for name, value in metrics.items():
        if isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isnan(number):
            continue
        rows.append([str(name), number, stamp, int(step)])
    return {"v": OP_VERSION, "op": "log_metrics", "key": _check_key(key), "metrics": rows}


def log_params(key: Sequence[str], params: Mapping[str, Any]) -> Op:
    """Log ``params`` on the run with ``key``. Re-logging a param with the value it has is a
    no-op; with another value MLflow refuses it (400) and the op is dropped and recorded."""
    return {"v": OP_VERSION, "op": "log_params", "key": _check_key(key),
            "params": _str_map(params, MAX_PARAM_VALUE)}


def set_tags(key: Sequence[str], tags: Mapping[str, Any]) -> Op:
    """Set ``tags`` (overwriting) on the run with ``key``; values cut to MLflow's limit."""
    return {"v": OP_VERSION, "op": "set_tags", "key": _check_key(key),
            "tags": _str_map(tags, MAX_TAG_VALUE)}


def set_terminated(key: Sequence[str], status: str = "FINISHED", *,
                   end_time_ms: int | None = None) -> Op:
    """End the run with ``key`` as ``status`` (FINISHED, FAILED or KILLED) at
    ``end_time_ms`` (default now, fixed in the op). To run it again use
    :func:`ensure_run` with ``reopen=True``."""
    status = str(status).upper()
    if status not in _TERMINAL:
        raise ValueError(f"set_terminated: status must be one of {_TERMINAL}, not {status!r}")
    return {"v": OP_VERSION, "op": "set_terminated", "key": _check_key(key), "status": status,
            "time_ms": int(end_time_ms) if end_time_ms is not None else _now_ms()}


def log_artifact(key: Sequence[str], local_path: str | Path,
                 artifact_path: str | None = None) -> Op:
    """Upload a local file, or every file under a local folder (keeping its layout), to the
    run with ``key`` under ``artifact_path``. A file whose name already exists there with the
    same size is skipped, so a repeat uploads nothing. The file is read when the op is
    applied, possibly much later: it must stay where it is (e.g. under the sweep's storage);
    one that is gone by then makes the op dropped."""
    return {"v": OP_VERSION, "op": "log_artifact", "key": _check_key(key),
            "path": str(Path(local_path).absolute()),
            "artifact_path": str(artifact_path).strip("/") if artifact_path else None}


# ---------------------------------------------------------------------------------- errors


class _Refused(Exception):
    """An op that can never succeed as it is (bad op, missing run, missing local file)."""


class _StoreNotReady(ConnectionError):
    """The store could not be opened (e.g. its tables are being created): retry later."""


class _ServerAnswered(MlflowException):
    """The server answered with a status that means "not now" (5xx, 408, 429)."""

    def __init__(self, status: int, endpoint: str, body: str) -> None:
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE

        super().__init__(f"MLflow answered {status} to {endpoint}: {body[:300]}",
                         error_code=INTERNAL_ERROR if status == 500 else TEMPORARILY_UNAVAILABLE)
        self.status = status


DOWN, SERVER_ERROR, REFUSED = "down", "server_error", "refused"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify(exc: BaseException) -> str:
    """DOWN: MLflow did not answer or said "not now"; retry with backoff, forever.
    SERVER_ERROR: it answered 500 (or a local store failed with an I/O error); retry, but
    give up after a while, since it may be this op that breaks it. REFUSED: it will never
    succeed (4xx, a bad op, a bug); drop it now."""
    import requests

    if isinstance(exc, _Refused):
        return REFUSED
    if isinstance(exc, _ServerAnswered):
        return SERVER_ERROR if exc.status == 500 else DOWN
    never = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
             requests.exceptions.InvalidSchema)
    for e in _chain(exc):
        if isinstance(e, never):
            return REFUSED
        if isinstance(e, requests.exceptions.RequestException | ConnectionError | TimeoutError):
            return DOWN
        if type(e).__name__ in ("OperationalError", "DisconnectionError") and \
                type(e).__module__.startswith("sqlalchemy"):
            return DOWN  # SQLite busy or its file unreachable, a database server gone
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        if status in (408, 429, 502, 503, 504):
            return DOWN
        return SERVER_ERROR if status >= 500 else REFUSED
    if isinstance(exc, OSError):
        return SERVER_ERROR  # a full or unreachable artifact disk: may clear up, may not
    return REFUSED


# ---------------------------------------------------------------------------------- MLflow


def _host_creds(uri: str) -> Any:
    try:
        from mlflow.utils.credentials import get_default_host_creds
    except ImportError:  # pragma: no cover - MLflow 2.x
        from mlflow.tracking._tracking_service.utils import (
            _get_default_host_creds as get_default_host_creds,
        )
    return get_default_host_creds(uri)


def _raise_if_not_now(response: Any, endpoint: str) -> None:
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise _ServerAnswered(response.status_code, endpoint, response.text or "")


class _FastFailRestStore(RestStore):
    """MLflow's REST store, making each request once with a short timeout.

    ``RestStore._call_endpoint`` reaches ``http_request`` without retry arguments, so the
    process-wide environment (minutes of retries) would apply; this does what it does but
    passes ``max_retries=0`` and ``timeout`` explicitly, and turns "not now" answers into
    :class:`_ServerAnswered` before MLflow's error mapping loses the status code."""

    def __init__(self, uri: str, timeout_s: float) -> None:
        super().__init__(partial(_host_creds, uri))
        self._timeout_s = timeout_s

    def _call_endpoint(self, api: Any, json_body: Any = None, endpoint: str | None = None,
                       retry_timeout_seconds: Any = None, response_proto: Any = None) -> Any:
        from mlflow.utils.proto_json_utils import parse_dict

        v3 = api in getattr(self, "_V3_APIS", ())
        table = getattr(self, "_V3_METHOD_TO_INFO", None) if v3 else self._METHOD_TO_INFO
        if table is None:  # pragma: no cover - an MLflow this was not written for
            return super()._call_endpoint(api, json_body, endpoint, retry_timeout_seconds,
                                          response_proto)
        validate = getattr(self, "_validate_workspace_support_if_specified", None)
        if validate is not None:
            validate()
        default_endpoint, method = table[api]
        endpoint = endpoint or default_endpoint
        response_proto = response_proto or api.Response()
        body = json.loads(json_body) if json_body is not None else None
        kwargs = {"params": body} if method == "GET" else {"json": body}
        response = http_request(self.get_host_creds(), endpoint, method, max_retries=0,
                                backoff_factor=0, backoff_jitter=0, timeout=self._timeout_s,
                                raise_on_status=False, **kwargs)
        _raise_if_not_now(response, endpoint)
        response = verify_rest_response(response, endpoint)
        if response.status_code == 204:
            return response_proto
        parse_dict(js_dict=json.loads(response.text), message=response_proto)
        return response_proto


def _make_store(uri: str, timeout_s: float) -> Any:
    if uri.startswith(("http://", "https://")):
        return _FastFailRestStore(uri, timeout_s)
    from mlflow.tracking._tracking_service.utils import _get_store

    return _get_store(uri)  # what MlflowClient uses; local stores have no HTTP retries


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _ArtifactTarget:
    """One run's artifact store: list a folder (name -> size) and upload a file. Over
    HTTP (the tracking server's proxied ``mlflow-artifacts``) each request is made once
    with the writer's timeout, like the REST store; others (local folders, object stores)
    use MLflow's repository as it is."""

    _ENDPOINT = "/mlflow-artifacts/artifacts"

    def __init__(self, repo: Any, timeout_s: float) -> None:
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        self.repo = repo
        self.http = isinstance(repo, HttpArtifactRepository) and \
            self._ENDPOINT in repo.artifact_uri
        self.timeout_s = timeout_s

    def _request(self, uri: str, endpoint: str, method: str, **kwargs: Any) -> Any:
        from mlflow.utils.rest_utils import augmented_raise_for_status

        response = http_request(_host_creds(uri), endpoint, method, max_retries=0,
                                backoff_factor=0, backoff_jitter=0, timeout=self.timeout_s,
                                raise_on_status=False, **kwargs)
        _raise_if_not_now(response, endpoint)
        augmented_raise_for_status(response)
        return response

    def sizes(self, folder: str | None) -> dict[str, int | None]:
        if not self.http:
            return {posixpath.basename(f.path): f.file_size
                    for f in self.repo.list_artifacts(folder) if not f.is_dir}
        base, tail = self.repo.artifact_uri.split(self._ENDPOINT, maxsplit=1)
        root = tail.lstrip("/")
        response = self._request(base, self._ENDPOINT, "GET", params={
            "path": posixpath.join(root, folder) if folder else root})
        return {posixpath.basename(f["path"]): int(f["file_size"]) if "file_size" in f else None
                for f in response.json().get("files", []) if not f.get("is_dir")}

    def upload(self, local: Path, folder: str | None) -> None:
        if not self.http:
            self.repo.log_artifact(str(local), folder)
            return
        endpoint = posixpath.join("/", *((folder, local.name) if folder else (local.name,)))
        mime = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
        with open(local, "rb") as handle:
            self._request(self.repo.artifact_uri, endpoint, "PUT", data=handle,
                          extra_headers={"Content-Type": mime})


class _Applier:
    """Applies ops to one experiment of one tracking URI; raises what the store raises."""

    def __init__(self, uri: str, experiment: str, *, timeout_s: float,
                 artifact_location: str | None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.timeout_s = timeout_s
        self.artifact_location = artifact_location
        if artifact_location is None and uri.startswith("sqlite:///"):
            # The same place debias.tracking.Tracker gives the experiment, so whichever of the
            # two creates it, both agree.
            db = Path(uri[len("sqlite:///"):])
            self.artifact_location = (db.absolute().parent / "mlartifacts").as_uri()
        self._store: Any = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}
        self._artifacts: dict[str, _ArtifactTarget] = {}
        self._warned_conflicts: set[str] = set()

    @property
    def store(self) -> Any:
        if self._store is None:
            try:
                self._store = _make_store(self.uri, self.timeout_s)
            except Exception as exc:
                # A new SQL store whose tables another program is creating right now (its
                # migrations race ours): not a refusal of this op, so retried, never dropped.
                raise _StoreNotReady(f"the tracking store cannot be opened yet: "
                                     f"{_describe(exc)}") from exc
        return self._store

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.store.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.store.create_experiment(
                        self.experiment, artifact_location=self.artifact_location)
                except MlflowException as exc:  # another client created it in between
                    found = self.store.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise exc from None
            if found is not None:
                if found.lifecycle_stage != "active":
                    raise _Refused(f"MLflow experiment {self.experiment!r} is deleted; "
                                   "restore it (mlflow experiments restore) to write to it")
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def run_id(self, key: Sequence[str]) -> str | None:
        """The cached MLflow run id of ``key`` (no lookup)."""
        return self._runs.get(_canonical(key))

    # --------------------------------------------------------------- finding runs

    def _search(self, filter_string: str) -> list[Any]:
        return list(self.store.search_runs(
            [self.experiment_id()], filter_string, ViewType.ACTIVE_ONLY, max_results=100,
            order_by=["attributes.start_time ASC"]))

    def _find(self, key: Sequence[str]) -> Any:
        """The run with ``key`` (the oldest, should there be several), or None."""
        canon = _canonical(key)
        runs = self._search(f"tags.`{KEY_ID_TAG}` = '{key_id(key)}'")
        runs = [r for r in runs if r.data.tags.get(KEY_TAG) == canon] or runs
        if len(runs) > 1:
            log.warning("MLflow has %d runs with key %s; writing to the oldest, %s",
                        len(runs), canon, runs[0].info.run_id)
        if runs:
            self._runs[canon] = runs[0].info.run_id
            return runs[0]
        return None

    def resolve(self, key: Sequence[str]) -> str:
        canon = _canonical(key)
        if canon not in self._runs and self._find(key) is None:
            raise _Refused(f"no MLflow run has key {canon} (no ensure_run created it)")
        return self._runs[canon]

    def _adopt(self, op: Op, parent_id: str | None) -> Any:
        match = op.get("match") or {}
        if not match or any("'" in v or "\\" in v for v in match.values()):
            return None
        clauses = [f"tags.`{k}` = '{v}'" for k, v in sorted(match.items())]
        if parent_id:
            clauses.append(f"tags.`mlflow.parentRunId` = '{parent_id}'")
        runs = [r for r in self._search(" and ".join(clauses)) if KEY_ID_TAG not in r.data.tags]
        return runs[0] if runs else None

    # --------------------------------------------------------------- ops

    def apply(self, op: Op) -> None:
        handler: Callable[[Op], None] | None = getattr(self, f"_op_{op.get('op')}", None)
        if op.get("v") != OP_VERSION or handler is None or not isinstance(op.get("key"), list):
            raise _Refused(f"not an op this version understands: {str(op)[:200]}")
        handler(op)

    def _op_ensure_run(self, op: Op) -> None:
        key, canon = op["key"], _canonical(op["key"])
        run = None
        if canon in self._runs:
            run = self.store.get_run(self._runs[canon])
            if run.info.lifecycle_stage != "active":
                del self._runs[canon]
                run = None
        if run is None:
            run = self._find(key)
        parent_id = self.resolve(op["parent"]) if op.get("parent") else None
        wanted = {**op["tags"], KEY_TAG: canon, KEY_ID_TAG: key_id(key)}
        if parent_id:
            wanted["mlflow.parentRunId"] = parent_id
        if run is None:
            run = self._adopt(op, parent_id)
        if run is None:
            run = self.store.create_run(
                experiment_id=self.experiment_id(), user_id=wanted.get("mlflow.user", "unknown"),
                start_time=op["time_ms"], tags=[RunTag(k, v) for k, v in wanted.items()],
                run_name=op["name"])
            self._runs[canon] = run.info.run_id
            have_params: dict[str, str] = {}
        else:
            self._runs[canon] = run.info.run_id
            have_params = dict(run.data.params)
            changed = [RunTag(k, v) for k, v in wanted.items() if run.data.tags.get(k) != v]
            for chunk in _chunks(changed, PARAMS_TAGS_PER_BATCH):
                self.store.log_batch(run.info.run_id, metrics=[], params=[], tags=chunk)
        run_id = run.info.run_id
        conflicts = sorted(k for k, v in op["params"].items()
                           if k in have_params and have_params[k] != v)
        if conflicts and canon not in self._warned_conflicts:
            self._warned_conflicts.add(canon)
            log.warning("run %s (key %s) already has other values for params %s; kept them "
                        "(MLflow params never change)", run_id, canon, conflicts[:10])
        missing = [Param(k, v) for k, v in op["params"].items() if k not in have_params]
        for chunk in _chunks(missing, PARAMS_TAGS_PER_BATCH):
            self.store.log_batch(run_id, metrics=[], params=chunk, tags=[])
        if op.get("reopen") and run.info.status != "RUNNING":
            self.store.update_run_info(run_id, run_status=RunStatus.RUNNING, end_time=None,
                                       run_name=None)

    def _op_log_metrics(self, op: Op) -> None:
        run_id = self.resolve(op["key"])
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op["metrics"]]
        if self._keeps_repeats():
            metrics = self._unseen(run_id, metrics)
        for chunk in _chunks(metrics, METRICS_PER_BATCH):
            self.store.log_batch(run_id, metrics=chunk, params=[], tags=[])

    def _keeps_repeats(self) -> bool:
        """The deprecated file store (``file:`` URIs, refused by MLflow 3 unless
        ``MLFLOW_ALLOW_FILE_STORE`` is set) appends an identical metric row again, where the
        SQL store drops it; for that local store, the history is checked here instead."""
        from mlflow.store.tracking.file_store import FileStore

        return isinstance(self.store, FileStore)

    def _unseen(self, run_id: str, metrics: list[Any]) -> list[Any]:
        seen: dict[str, set[tuple[int, int, float]]] = {}
        out = []
        for m in metrics:
            if m.key not in seen:
                seen[m.key] = {(h.timestamp, h.step, h.value)
                               for h in self.store.get_metric_history(run_id, m.key)}
            if (m.timestamp, m.step, m.value) not in seen[m.key]:
                seen[m.key].add((m.timestamp, m.step, m.value))
                out.append(m)
        return out

    def _op_log_params(self, op: Op) -> None:
        run_id = self.resolve(op["key"])
        params = [Param(k, v) for k, v in op["params"].items()]
        for chunk in _chunks(params, PARAMS_TAGS_PER_BATCH):
            self.store.log_batch(run_id, metrics=[], params=chunk, tags=[])

    def _op_set_tags(self, op: Op) -> None:
        run_id = self.resolve(op["key"])
        tags = [RunTag(k, v) for k, v in op["tags"].items()]
        for chunk in _chunks(tags, PARAMS_TAGS_PER_BATCH):
            self.store.log_batch(run_id, metrics=[], params=[], tags=chunk)

    def _op_set_terminated(self, op: Op) -> None:
        run_id = self.resolve(op["key"])
        self.store.update_run_info(run_id, run_status=RunStatus.from_string(op["status"]),
                                   end_time=int(op["time_ms"]), run_name=None)

    def _artifact_target(self, run_id: str) -> _ArtifactTarget:
        if run_id not in self._artifacts:
            from mlflow.store.artifact.artifact_repository_registry import (
                get_artifact_repository,
            )

            uri = self.store.get_run(run_id).info.artifact_uri
            try:
                repo = get_artifact_repository(uri, tracking_uri=self.uri)
            except TypeError:  # pragma: no cover - MLflow 2.x takes only the URI
                repo = get_artifact_repository(uri)
            self._artifacts[run_id] = _ArtifactTarget(repo, self.timeout_s)
        return self._artifacts[run_id]

    def _op_log_artifact(self, op: Op) -> None:
        source = Path(op["path"])
        if not source.exists():
            raise _Refused(f"artifact {source} no longer exists")
        run_id = self.resolve(op["key"])
        base = op.get("artifact_path") or None
        if source.is_file():
            files = [(source, base)]
        else:
            files = []
            for root, _dirs, names in os.walk(source):
                rel = Path(root).relative_to(source).as_posix()
                folder = posixpath.join(base or "", rel) if rel != "." else base
                files += [(Path(root) / n, folder or None) for n in sorted(names)]
        target = self._artifact_target(run_id)
        listed: dict[str | None, dict[str, int | None]] = {}
        for local, folder in files:
            if folder not in listed:
                listed[folder] = target.sizes(folder)
            if listed[folder].get(local.name) == local.stat().st_size:
                continue
            target.upload(local, folder)


# ---------------------------------------------------------------------------------- journal


class _Journal:
    """The ops not yet written, oldest first, in ``journal.jsonl``.

    Lines are appended (one ``write`` with ``O_APPEND``, then ``fsync``) and consumed from
    the front by an offset kept in memory; the consumed prefix is dropped by an atomic
    rewrite of the remainder (:func:`debias.files.atomic_output`) once it is at least as big
    as what is left (so draining costs linear I/O), when the journal empties, and on close.
    A crash in between only means ops that were written get written again, which the ops
    make harmless. Only one thread of one process uses a journal at a time (the lock)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = directory / JOURNAL_NAME
        self.max_bytes = max_bytes
        self._offset = 0   # start of the first unconsumed line
        self._read = 0     # where the read-ahead stopped
        self._size = 0     # bytes in the file
        self.count = 0     # unconsumed lines
        self._ahead: deque[tuple[bytes, int]] = deque()
        self.rejected: list[bytes] = []
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        good: list[bytes] = []
        lines = data.split(b"\n")
        if lines[-1] and _decode(lines[-1]) is None:
            log.warning("%s: its last line is incomplete (a write cut short by a crash); "
                        "skipped it", self.path)
            self.rejected.append(lines[-1])
            lines[-1] = b""
        for line in lines:
            if not line.strip():
                continue
            try:
                op = json.loads(line)
                if not isinstance(op, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.rejected.append(line)
                continue
            good.append(line + b"\n")
        clean = b"".join(good)
        if clean != data:  # offsets below count bytes of exactly these lines
            with atomic_output(self.path) as tmp:
                tmp.write_bytes(clean)
        self._size = len(clean)
        self.count = len(good)

    @property
    def bytes_pending(self) -> int:
        return self._size - self._offset

    def append(self, line: bytes) -> bool:
        """Append one op's line; False (nothing written) if it would pass the bound."""
        if self._size + len(line) > self.max_bytes and self._offset:
            self.compact()
        if self._size + len(line) > self.max_bytes:
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
                while written < len(line):  # only on a full disk or a signal, in practice
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # no torn line for the next append to follow
                raise
        finally:
            os.close(fd)
        self._size += len(line)
        self.count += 1
        return True

    def head(self) -> bytes | None:
        if not self._ahead and self._read < self._size:
            with open(self.path, "rb") as handle:
                handle.seek(self._read)
                chunk = handle.read(2**20)
                while chunk and b"\n" not in chunk and self._read + len(chunk) < self._size:
                    chunk += handle.read(2**20)
            cut = chunk.rfind(b"\n") + 1
            for line in chunk[:cut].split(b"\n")[:-1]:
                self._ahead.append((line, len(line) + 1))
            self._read += cut
        return self._ahead[0][0] if self._ahead else None

    def pop(self) -> None:
        _line, size = self._ahead.popleft()
        self._offset += size
        self.count -= 1
        if self.count == 0 or self._offset >= max(2**20, self._size - self._offset):
            self.compact()

    def compact(self) -> None:
        """Rewrite the file as just its unconsumed lines (atomically)."""
        if self._offset == 0:
            return
        with atomic_output(self.path) as tmp, open(self.path, "rb") as src, \
                open(tmp, "wb") as dst:
            src.seek(self._offset)
            while block := src.read(2**20):
                dst.write(block)
        self._size -= self._offset
        self._read -= self._offset
        self._offset = 0


def journal_pending(journal_dir: str | Path) -> int:
    """How many ops ``journal_dir`` holds, for a report after the writer is gone (no lock).
    Exact after :meth:`TrackingWriter.close`; after a crash it may count ops that were
    written but not yet forgotten (replaying those is harmless)."""
    path = Path(journal_dir) / JOURNAL_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return sum(1 for line in data.split(b"\n")[:-1] if line.strip())


# ---------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class DroppedOp:
    """An op MLflow refused for good (or that was given up): what it was and why."""

    op: Op
    reason: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class WriterStatus:
    """A snapshot of a writer: what waits, where, and since when MLflow is unreachable."""

    uri: str
    journal: Path
    queued: int        # in memory, not yet tried
    journaled: int     # on disk, waiting for MLflow
    in_flight: int     # being applied or journaled right now
    applied: int
    dropped: int
    lost: int          # refused by the journal's bound (or submitted after close)
    down_since: float | None
    last_error: str | None

    @property
    def pending(self) -> int:
        return self.queued + self.journaled + self.in_flight

    def summary(self) -> str:
        """One line for the end of a sweep."""
        parts = [f"{self.pending} MLflow write(s) pending for {self.uri}"]
        if self.pending:
            parts.append(f"kept in {self.journal}")
        if self.down_since is not None:
            since = time.strftime("%H:%M:%S", time.localtime(self.down_since))
            parts.append(f"server unreachable since {since}"
                         + (f" ({self.last_error})" if self.last_error else ""))
        if self.dropped:
            parts.append(f"{self.dropped} refused by MLflow (see "
                         f"{self.journal.parent / DROPPED_NAME})")
        if self.lost:
            parts.append(f"{self.lost} lost (journal full)")
        return "; ".join(parts)


def _redact(uri: str) -> str:
    return redact_uri(uri)


class _Drops:
    """Records dropped ops: logged (the first few one by one), kept in memory and appended
    to ``dropped.jsonl`` so nothing disappears without a trace."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / DROPPED_NAME
        self.items: list[DroppedOp] = []
        self.count = 0

    def add(self, op: Op, reason: str) -> None:
        self.count += 1
        if len(self.items) < 10_000:
            self.items.append(DroppedOp(op, reason))
        if self.count <= _LOG_EACH_DROP:
            log.warning("MLflow write dropped (%s %s): %s", op.get("op"), op.get("key"), reason)
        elif self.count % 100 == 0:
            log.warning("%d MLflow writes dropped so far (see %s)", self.count, self.path)
        try:
            if self.path.exists() and self.path.stat().st_size > MAX_DROPPED_FILE_BYTES:
                return
            line = json.dumps({"at": time.time(), "reason": reason, "op": op}) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
        except OSError:
            pass


def _decode(line: bytes) -> Op | None:
    try:
        op = json.loads(line)
    except ValueError:
        return None
    return op if isinstance(op, dict) else None


def _attempt(applier: _Applier, op: Op | None) -> tuple[str | None, BaseException | None]:
    """(None, None) when applied, else (the error's class, the error)."""
    if op is None:
        return REFUSED, _Refused("unreadable journal line")
    try:
        applier.apply(op)
    except Exception as exc:
        return _classify(exc), exc
    return None, None


def _describe(exc: BaseException) -> str:
    """One line about an error, credentials masked (MLflow's texts quote the URI)."""
    text = redact(str(exc)).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}"


class TrackingWriter:
    """Writes ops to MLflow in the background, journaling what MLflow cannot take now.

    ``submit`` is safe from any thread and never blocks or raises; ops are applied in the
    order they were submitted. One writer per journal folder: constructing a second one
    (in any process, while the first is open) raises :class:`debias.files.LockHeld`, whose
    note names the holder. Ops a previous writer left in the journal are written first.

    Args:
        uri: the tracking URI (``http(s)://`` server or ``sqlite:///`` file).
        experiment: the experiment's name (created on the first write if absent).
        journal_dir: this sweep's journal folder (see :func:`default_journal_dir`).
        max_journal_bytes: the journal's bound; past it ops are lost, with one warning.
        request_timeout_s: one HTTP attempt's timeout (no retries inside an attempt).
        retry_initial_s, retry_max_s: the backoff between attempts while MLflow is down.
        give_up_after: tries after which an op that keeps getting a 500 is dropped.
        max_queue: ops held in memory at most (only reached if journaling cannot keep up).
        artifact_location: for a new experiment; by default the one Tracker would choose.
        exit_timeout_s: at interpreter exit an open writer is closed with this timeout.

    Raises (only here, never later): :class:`debias.files.LockHeld` when another writer or
    replay owns ``journal_dir``; ``OSError`` when the folder cannot be created or read.
    Nothing talks to MLflow before the thread's first write, so a server that is down at
    start is no error either.
    """

    def __init__(self, uri: str, experiment: str, journal_dir: str | Path, *,
                 max_journal_bytes: int = DEFAULT_MAX_JOURNAL_BYTES,
                 request_timeout_s: float = 15.0, retry_initial_s: float = 0.5,
                 retry_max_s: float = 30.0, give_up_after: int = 20, max_queue: int = 100_000,
                 artifact_location: str | None = None, exit_timeout_s: float = 5.0) -> None:
        self.uri = uri
        remember_uri(uri)  # its password is masked in every warning this writer logs
        self.experiment = experiment
        self.journal_dir = Path(journal_dir)
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        self._lock: FileLock = acquire(self.journal_dir / LOCK_NAME, blocking=False)
        try:
            if not self._lock.held:
                log.warning("%s: the file system refuses locks; make sure no other process "
                            "writes this sweep's MLflow journal", self.journal_dir)
            self._lock.note(f"MLflow writer of experiment {experiment!r}, pid {os.getpid()} "
                            f"on {os.uname().nodename}")
            self._journal = _Journal(self.journal_dir, max_journal_bytes)
        except BaseException:
            self._lock.release()
            raise
        self._applier = _Applier(uri, experiment, timeout_s=request_timeout_s,
                                 artifact_location=artifact_location)
        self._drops = _Drops(self.journal_dir)
        for line in self._journal.rejected:
            self._drops.add({"raw": line.decode("utf-8", "replace")[:2000]},
                            "unreadable journal line")
        self._retry_initial_s, self._retry_max_s = retry_initial_s, retry_max_s
        self._give_up_after, self._max_queue = give_up_after, max_queue
        self._request_timeout_s, self._exit_timeout_s = request_timeout_s, exit_timeout_s
        self._cv = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._journaled = self._journal.count
        self._in_flight = 0
        # The drop count status() shows; it changes under the condition together with the
        # pending counters, so nobody sees an op both dropped and still pending.
        self._dropped = self._drops.count
        self._applied = 0
        self._lost = 0
        self._closing = False
        self._closed = False
        self._close_deadline = math.inf
        self._wake = False
        self._down_since: float | None = None
        self._last_error: str | None = None
        self._warned: set[str] = set()
        if self._journaled:
            log.warning("%d MLflow write(s) left by an earlier run in %s: writing them first",
                        self._journaled, self._journal.path)
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    # ------------------------------------------------------------------ caller side

    def submit(self, op: Op) -> None:
        """Queue ``op``; returns at once, whatever MLflow is doing, and never raises."""
        try:
            # ASCII: any string (even a lone surrogate from a file name) makes a valid line.
            line = (json.dumps(op, separators=(",", ":")) + "\n").encode("ascii")
        except (TypeError, ValueError) as exc:
            with self._cv:
                self._lost += 1
            self._warn_once("unserialisable", "an op that is not JSON (%s) was not submitted: %s",
                            exc, str(op)[:200])
            return
        try:
            with self._cv:
                if self._closing:
                    self._lost += 1
                    self._warn_once("closed", "MLflow writes submitted after close() are lost")
                    return
                if len(self._queue) >= self._max_queue:
                    self._lost += 1
                    self._warn_once("queue", "the MLflow write queue is full (%d ops): later "
                                    "writes are lost", self._max_queue)
                    return
                self._queue.append(line)
                self._cv.notify_all()
        except Exception:  # pragma: no cover - nothing above should raise
            log.exception("could not queue an MLflow write")

    def pending(self) -> int:
        """Ops submitted (or found in the journal) and not yet written or dropped."""
        with self._cv:
            return len(self._queue) + self._journaled + self._in_flight

    def status(self) -> WriterStatus:
        with self._cv:
            return WriterStatus(
                uri=_redact(self.uri), journal=self._journal.path, queued=len(self._queue),
                journaled=self._journaled, in_flight=self._in_flight, applied=self._applied,
                dropped=self._dropped, lost=self._lost, down_since=self._down_since,
                last_error=self._last_error)

    @property
    def dropped(self) -> list[DroppedOp]:
        """The ops MLflow refused for good, with the reason (the first 10,000)."""
        return list(self._drops.items)

    def run_id(self, key: Sequence[str]) -> str | None:
        """The MLflow run id of ``key`` if this writer has written to (or found) that run
        already; None otherwise. Never waits."""
        return self._applier.run_id(key)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every op so far is written (or dropped); retry a down server now rather
        than at the end of its backoff. True if everything drained within ``timeout_s``."""
        deadline = math.inf if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            self._wake = True
            self._cv.notify_all()
            while len(self._queue) + self._journaled + self._in_flight:
                if self._closed:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 1.0))
            return True

    def close(self, timeout_s: float = 10.0) -> int:
        """Write what can be written within ``timeout_s``, journal the rest, stop the thread
        and release the journal. Returns how many ops remain journaled (0: all written);
        logs one warning saying where they are when some do. Idempotent."""
        with self._cv:
            if not self._closing:
                self._closing = True
                self._close_deadline = time.monotonic() + max(0.0, timeout_s)
                self._wake = True
                self._cv.notify_all()
        self._thread.join(max(0.0, timeout_s) + self._request_timeout_s + 10.0)
        with contextlib.suppress(Exception):
            atexit.unregister(self._at_exit)
        if self._thread.is_alive():  # pragma: no cover - an attempt outlived its timeout
            log.error("the MLflow writer did not stop; %d write(s) may be lost", self.pending())
            return self.pending()
        with self._cv:
            already, self._closed = self._closed, True
            self._cv.notify_all()
        if not already:
            self._lock.release()
            left = self._journaled
            if left:
                log.warning("%s. They are written by the next --resume of this sweep, or by "
                            "--sync.", self.status().summary())
        return self._journaled

    def __enter__(self) -> TrackingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a TrackingWriter holds a thread and a lock and cannot be pickled; "
                        "keep it outside what Tune saves (e.g. a Callback's __getstate__)")

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close(self._exit_timeout_s)

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        backoff = self._retry_initial_s
        next_try = 0.0
        head_errors = 0
        while True:
            try:
                with self._cv:
                    while not (self._queue or self._journaled or self._closing):
                        self._cv.wait()
                    now = time.monotonic()
                    closing_now = self._closing and now >= self._close_deadline
                    nothing = not (self._queue or self._journaled)
                    if self._closing and (nothing or closing_now):
                        break
                    down = self._down_since is not None
                    if self._journaled and down and not self._wake and now < next_try:
                        if self._queue:  # keep what arrives during an outage on disk
                            line = self._queue.popleft()
                            self._in_flight = 1
                        else:
                            self._cv.wait(min(next_try, self._close_deadline) - now)
                            continue
                    elif self._journaled:
                        line = None
                    else:
                        line = self._queue.popleft()
                        self._in_flight = 1
                    self._wake = False
                if line is not None and self._journaled:
                    self._spill(line)  # behind the journal while MLflow is down
                    continue
                if line is not None:  # nothing journaled: write it directly
                    error, exc = _attempt(self._applier, _decode(line))
                    if error is None:
                        self._done(applied=True)
                    elif error == REFUSED:
                        self._drop(line, exc)
                    else:
                        self._spill(line)
                        head_errors = 1 if error == SERVER_ERROR else 0
                        self._went_down(exc)
                        backoff = self._retry_initial_s
                        next_try = time.monotonic() + self._jitter(backoff)
                    continue
                head = self._journal.head()
                if head is None:  # pragma: no cover - count and file disagree
                    with self._cv:
                        self._journaled = self._journal.count = 0
                    continue
                error, exc = _attempt(self._applier, _decode(head))
                if error is None or error == REFUSED or (
                        error == SERVER_ERROR and head_errors + 1 >= self._give_up_after):
                    if error is not None:
                        reason = _describe(exc) if exc else "refused"
                        if error == SERVER_ERROR:
                            reason = f"gave up after {head_errors + 1} server errors: {reason}"
                        self._drops_add(head, reason)
                    self._journal.pop()
                    head_errors = 0
                    backoff = self._retry_initial_s
                    with self._cv:
                        self._journaled = self._journal.count
                        self._dropped = self._drops.count
                        if error is None:
                            self._applied += 1
                        if error is None or not isinstance(exc, _Refused):
                            self._back_up()  # MLflow itself answered
                        self._cv.notify_all()
                else:
                    head_errors += error == SERVER_ERROR
                    self._went_down(exc)
                    next_try = time.monotonic() + self._jitter(backoff)
                    backoff = min(backoff * 2, self._retry_max_s)
            except Exception:  # a bug or a failing disk: say so, keep going, never spin
                log.exception("MLflow writer: unexpected error")
                with self._cv:
                    self._in_flight = 0
                    self._cv.notify_all()
                time.sleep(min(1.0, self._retry_max_s))
        self._finish()

    def _jitter(self, seconds: float) -> float:
        return seconds * random.uniform(0.8, 1.2)

    def _spill(self, line: bytes) -> None:
        """Append a queued op to the journal (or count it lost past the bound)."""
        try:
            ok = self._journal.append(line)
        except OSError as exc:
            ok = False
            self._warn_once("journal-io", "cannot write the MLflow journal %s (%s): writes "
                            "MLflow cannot take now are lost", self._journal.path, exc)
        with self._cv:
            self._in_flight = 0
            self._journaled = self._journal.count
            if not ok:
                self._lost += 1
                self._warn_once("journal-full", "the MLflow journal %s is full (%d MB): "
                                "writes MLflow cannot take now are lost until it answers "
                                "again", self._journal.path, self._journal.max_bytes // 2**20)
            self._cv.notify_all()

    def _done(self, applied: bool, answered: bool = True) -> None:
        with self._cv:
            self._in_flight = 0
            self._dropped = self._drops.count
            if applied:
                self._applied += 1
            if answered:
                self._back_up()
            self._cv.notify_all()

    def _drops_add(self, line: bytes, reason: str) -> None:
        # Only this thread adds; readers copy the list (atomic under the GIL), so the file
        # write stays outside the condition that submit() takes.
        self._drops.add(_decode(line) or {"raw": line.decode("utf-8", "replace")[:2000]}, reason)

    def _drop(self, line: bytes, exc: BaseException | None) -> None:
        self._drops_add(line, _describe(exc) if exc else "refused")
        # A local refusal (a missing artifact file, a bad op) says nothing about MLflow.
        self._done(applied=False, answered=not isinstance(exc, _Refused))

    def _went_down(self, exc: BaseException | None) -> None:
        with self._cv:
            self._last_error = _describe(exc) if exc else None
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("MLflow at %s does not take writes now (%s); keeping them in %s "
                            "and retrying in the background", _redact(self.uri),
                            self._last_error, self._journal.path)

    def _back_up(self) -> None:
        """Under the condition: MLflow answered; say so once per outage."""
        if self._down_since is not None:
            log.warning("MLflow at %s answers again after %.0f s; writing the %d journaled "
                        "write(s)", _redact(self.uri), time.time() - self._down_since,
                        self._journaled)
            self._down_since = None
            self._last_error = None

    def _finish(self) -> None:
        """On close: everything still in memory goes to the journal, which is compacted."""
        while True:
            with self._cv:
                if not self._queue:
                    break
                line = self._queue.popleft()
                self._in_flight = 1
            self._spill(line)
        try:
            self._journal.compact()
        except OSError as exc:  # pragma: no cover - the remainder is still in the file
            log.warning("could not compact the MLflow journal %s: %s", self._journal.path, exc)
        with self._cv:
            self._cv.notify_all()


# ---------------------------------------------------------------------------------- replay


def replay(uri: str, experiment: str, journal_dir: str | Path, *, retry_for_s: float = 0.0,
           request_timeout_s: float = 15.0, artifact_location: str | None = None) -> int:
    """Write the ops a sweep left in ``journal_dir`` (what ``--sync`` runs), in order.

    Written ops are removed from the journal (the remainder is rewritten atomically), ops
    MLflow refuses for good are dropped (logged, and kept in ``dropped.jsonl``). If MLflow
    does not answer, retries with backoff for up to ``retry_for_s`` seconds, then stops,
    leaving the rest journaled for next time (see :func:`journal_pending`). Replaying again
    writes nothing twice. Returns how many ops were written. Raises
    :class:`debias.files.LockHeld` when a live writer (a running sweep) owns the journal.
    """
    directory = Path(journal_dir)
    remember_uri(uri)
    if not (directory / JOURNAL_NAME).exists():
        return 0
    lock = acquire(directory / LOCK_NAME, blocking=False)
    try:
        lock.note(f"MLflow replay of experiment {experiment!r}, pid {os.getpid()}")
        journal = _Journal(directory, max_bytes=2**62)
        drops = _Drops(directory)
        for line in journal.rejected:
            drops.add({"raw": line.decode("utf-8", "replace")[:2000]}, "unreadable journal line")
        applier = _Applier(uri, experiment, timeout_s=request_timeout_s,
                           artifact_location=artifact_location)
        applied, head_errors, backoff = 0, 0, 0.5
        deadline = time.monotonic() + retry_for_s
        try:
            while (head := journal.head()) is not None:
                op = _decode(head)
                error, exc = _attempt(applier, op)
                if error is None:
                    applied += 1
                elif error == REFUSED or (error == SERVER_ERROR and head_errors + 1 >= 20):
                    drops.add(op or {"raw": head.decode("utf-8", "replace")[:2000]},
                              _describe(exc) if exc else "refused")
                else:
                    head_errors += error == SERVER_ERROR
                    if time.monotonic() + backoff > deadline:
                        log.warning("MLflow at %s does not take writes (%s); %d write(s) stay "
                                    "in %s", _redact(uri), _describe(exc) if exc else error,
                                    journal.count, journal.path)
                        break
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                journal.pop()
                head_errors, backoff = 0, 0.5
        finally:
            journal.compact()
        return applied
    finally:
        lock.release()
