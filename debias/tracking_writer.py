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
  Consecutive metric, param and tag writes of one run (the epochs of a trial, a drained
  journal) go to MLflow as one ``log_batch`` call, within MLflow's limits per call.
- Every op is idempotent, so applying one twice (a crash after MLflow wrote it but before the
  journal forgot it, or ``replay`` run twice) writes nothing twice: runs are found by their
  key before one is created, params are logged once, tags and statuses are overwrites, metric
  rows carry their own timestamp and step (MLflow's SQL store drops a row identical in key,
  value, timestamp and step, whether reached directly or through the REST server) and an
  artifact whose name and size already exist is not uploaded again.
- The thread is a small state machine (:class:`Link`): UP, ops are written as they come;
  DOWN, MLflow does not answer (connection refused or reset, timeout, 5xx, 408, 429, SQLite
  busy), so the op and every later one go, in order, to an on-disk **journal**: one JSON line
  per op in ``journal_dir/journal.jsonl``, each appended with a single ``write`` on an
  ``O_APPEND`` descriptor and ``fsync``-ed, bounded by ``max_journal_bytes`` (past it ops are
  counted as lost, with one warning), while the journal's head is retried with exponential
  backoff; once MLflow answers the journal drains in order, and trials keep being scheduled
  meanwhile because nothing here waits on the caller's thread. CLOSING: see ``close``.
- Ops MLflow refuses for good (a 4xx other than 408/429, e.g. a param re-logged with another
  value, or an op for a key no :func:`ensure_run` created) are logged once, recorded in
  :attr:`TrackingWriter.dropped` and in ``journal_dir/dropped.jsonl``, and skipped: retrying
  them cannot help and must not hold up the ops behind them (a merged call MLflow refuses is
  retried op by op, so only the op it objects to is dropped). An op that keeps getting a
  bare 500 (the server answers, but fails on this op) is given up after ``give_up_after``
  tries.
- :meth:`TrackingWriter.close` journals whatever is still unwritten; :func:`replay` (what
  ``--sync`` runs) and a new :class:`TrackingWriter` on the same folder (what ``--resume``
  does) write it later. One process at a time owns a journal (``journal.lock``, via
  :func:`debias.files.acquire`).

MLflow is reached only through :mod:`debias.mlflow_adapter`: the public ``MlflowClient`` for
local and database stores; for a tracking server, MLflow's REST API with one attempt per
request within ``request_timeout_s`` (MLflow's own client retries for minutes, configured only
process-wide), so the writer's backoff, which holds no one up, does the retrying and other
MLflow clients of the process keep their settings.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import hashlib
import itertools
import json
import logging
import math
import os
import posixpath
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from debias import mlflow_adapter
from debias.files import FileLock, LockHeld, acquire, atomic_output
from debias.mlflow_adapter import DOWN, REFUSED, SERVER_ERROR, Batch, RunRecord
from debias.redaction import redact, redact_uri, remember_uri

__all__ = [
    "DEFAULT_MAX_JOURNAL_BYTES", "KEY_ID_TAG", "KEY_TAG", "DroppedOp", "Link", "LockHeld", "Op",
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
#: MLflow's length limits: values are cut to these when an op is built.
MAX_PARAM_VALUE = mlflow_adapter.MAX_PARAM_VALUE
MAX_TAG_VALUE = mlflow_adapter.MAX_TAG_VALUE
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


def _classify(exc: BaseException) -> str:
    """DOWN, SERVER_ERROR or REFUSED (see :func:`debias.mlflow_adapter.classify`); a local
    refusal of the writer's own is REFUSED."""
    return REFUSED if isinstance(exc, _Refused) else mlflow_adapter.classify(exc)


def _describe(exc: BaseException) -> str:
    """One line about an error, credentials masked (MLflow's texts quote the URI)."""
    text = redact(str(exc)).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------- applying


class _Applier:
    """Applies ops to one experiment of one tracking URI through :mod:`debias.mlflow_adapter`;
    raises what the store raises."""

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
        self._backend: mlflow_adapter.Backend | None = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}
        self._warned_conflicts: set[str] = set()

    @property
    def backend(self) -> mlflow_adapter.Backend:
        if self._backend is None:
            try:
                self._backend = mlflow_adapter.connect(self.uri, self.timeout_s)
            except Exception as exc:
                # A new SQL store whose tables another program is creating right now (its
                # migrations race ours): not a refusal of this op, so retried, never dropped.
                raise _StoreNotReady(f"the tracking store cannot be opened yet: "
                                     f"{_describe(exc)}") from exc
        return self._backend

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.backend.find_experiment(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.backend.create_experiment(
                        self.experiment, self.artifact_location)
                    return self._experiment_id
                except Exception as exc:
                    if _classify(exc) != REFUSED:
                        raise
                    # Refused: another client may have created it in between.
                    found = self.backend.find_experiment(self.experiment)
                    if found is None:
                        raise
            if found.lifecycle_stage != "active":
                raise _Refused(f"MLflow experiment {self.experiment!r} is deleted; "
                               "restore it (mlflow experiments restore) to write to it")
            self._experiment_id = found.experiment_id
        return self._experiment_id

    def run_id(self, key: Sequence[str]) -> str | None:
        """The cached MLflow run id of ``key`` (no lookup)."""
        return self._runs.get(_canonical(key))

    # --------------------------------------------------------------- finding runs

    def _search(self, filter_string: str) -> list[RunRecord]:
        return self.backend.search_runs(self.experiment_id(), filter_string, 100)

    def _find(self, key: Sequence[str]) -> RunRecord | None:
        """The run with ``key`` (the oldest, should there be several), or None."""
        canon = _canonical(key)
        runs = self._search(f"tags.`{KEY_ID_TAG}` = '{key_id(key)}'")
        runs = [r for r in runs if r.tags.get(KEY_TAG) == canon] or runs
        if len(runs) > 1:
            log.warning("MLflow has %d runs with key %s; writing to the oldest, %s",
                        len(runs), canon, runs[0].run_id)
        if runs:
            self._runs[canon] = runs[0].run_id
            return runs[0]
        return None

    def resolve(self, key: Sequence[str]) -> str:
        canon = _canonical(key)
        if canon not in self._runs and self._find(key) is None:
            raise _Refused(f"no MLflow run has key {canon} (no ensure_run created it)")
        return self._runs[canon]

    def _adopt(self, op: Op, parent_id: str | None) -> RunRecord | None:
        match = op.get("match") or {}
        if not match or any("'" in v or "\\" in v for v in match.values()):
            return None
        clauses = [f"tags.`{k}` = '{v}'" for k, v in sorted(match.items())]
        if parent_id:
            clauses.append(f"tags.`mlflow.parentRunId` = '{parent_id}'")
        runs = [r for r in self._search(" and ".join(clauses)) if KEY_ID_TAG not in r.tags]
        return runs[0] if runs else None

    # --------------------------------------------------------------- ops

    def apply(self, group: _Group) -> None:
        """Write a group: its merged batch in one call, or its one op."""
        op = group.ops[0]
        if group.batch is not None:
            self._log(self.resolve(op["key"]), group.batch)
            return
        handler: Callable[[Op], None] | None = getattr(self, f"_op_{op.get('op')}", None) \
            if op is not None else None
        if op is None or op.get("v") != OP_VERSION or handler is None or \
                not isinstance(op.get("key"), list):
            raise _Refused(f"not an op this version understands: {str(op)[:200]}")
        handler(op)

    def _log(self, run_id: str, batch: Batch) -> None:
        if self.backend.keeps_repeated_metric_rows and batch.metrics:
            batch = self._unseen(run_id, batch)
        self.backend.log_batch(run_id, batch)

    def _log_all(self, run_id: str, metrics: Sequence[Sequence[Any]] = (),
                 params: Mapping[str, str] | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        """Writes that may need several calls (each within MLflow's limits)."""
        for batch in mlflow_adapter.batches(metrics, params, tags):
            self._log(run_id, batch)

    def _unseen(self, run_id: str, batch: Batch) -> Batch:
        """The deprecated file store (``file:`` URIs, refused by MLflow 3 unless
        ``MLFLOW_ALLOW_FILE_STORE`` is set) appends an identical metric row again, where the
        SQL store drops it; for that local store, the history is checked here instead."""
        seen: dict[str, set[tuple[int, int, float]]] = {}
        out = Batch()
        out.params, out.tags = batch.params, batch.tags
        for row in batch.metrics:
            name, value, stamp, step = row
            if name not in seen:
                seen[name] = {(t, s, v) for _k, v, t, s in self.backend.metric_history(run_id,
                                                                                      name)}
            if (stamp, step, value) not in seen[name]:
                out.metrics[row] = None
        return out

    def _known_run(self, key: Sequence[str]) -> RunRecord | None:
        """The active run with ``key``: the cached one, else the one MLflow finds."""
        canon = _canonical(key)
        if canon in self._runs:
            run = self.backend.get_run(self._runs[canon])
            if run.lifecycle_stage == "active":
                return run
            del self._runs[canon]
        return self._find(key)

    def _op_ensure_run(self, op: Op) -> None:
        key, canon = op["key"], _canonical(op["key"])
        run = self._known_run(key)
        parent_id = self.resolve(op["parent"]) if op.get("parent") else None
        wanted = {**op["tags"], KEY_TAG: canon, KEY_ID_TAG: key_id(key)}
        if parent_id:
            wanted["mlflow.parentRunId"] = parent_id
        if run is None:
            run = self._adopt(op, parent_id)
        if run is None:
            run = self.backend.create_run(self.experiment_id(), name=op["name"],
                                          start_time=op["time_ms"], tags=wanted)
        self._runs[canon] = run.run_id
        conflicts = sorted(k for k, v in op["params"].items()
                           if k in run.params and run.params[k] != v)
        if conflicts and canon not in self._warned_conflicts:
            self._warned_conflicts.add(canon)
            log.warning("run %s (key %s) already has other values for params %s; kept them "
                        "(MLflow params never change)", run.run_id, canon, conflicts[:10])
        self._log_all(run.run_id,
                      params={k: v for k, v in op["params"].items() if k not in run.params},
                      tags={k: v for k, v in wanted.items() if run.tags.get(k) != v})
        if op.get("reopen") and run.status != "RUNNING":
            self.backend.set_status(run.run_id, "RUNNING", None)

    def _op_log_metrics(self, op: Op) -> None:
        self._log_all(self.resolve(op["key"]), metrics=op["metrics"])

    def _op_log_params(self, op: Op) -> None:
        self._log_all(self.resolve(op["key"]), params=op["params"])

    def _op_set_tags(self, op: Op) -> None:
        self._log_all(self.resolve(op["key"]), tags=op["tags"])

    def _op_set_terminated(self, op: Op) -> None:
        self.backend.set_status(self.resolve(op["key"]), op["status"], int(op["time_ms"]))

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
        listed: dict[str | None, dict[str, int | None]] = {}
        for local, folder in files:
            if folder not in listed:
                listed[folder] = self.backend.artifact_sizes(run_id, folder)
            if listed[folder].get(local.name) == local.stat().st_size:
                continue
            self.backend.upload_artifact(run_id, local, folder)


# ---------------------------------------------------------------------------------- groups


#: Ops whose writes merge into one ``log_batch`` call.
_MERGEABLE = ("log_metrics", "log_params", "set_tags")
#: The most ops one attempt writes (an op may log nothing, e.g. only NaN metrics).
_GROUP_OPS = mlflow_adapter.LIMITS.entities


@dataclass
class _Group:
    """The ops at the front of what waits that one attempt writes, as read (``lines``)."""

    lines: list[bytes]
    ops: list[Op | None]
    batch: Batch | None = None  # their merged writes, when there are several ops


_SHAPES: dict[str, type] = {"metrics": list, "params": dict, "tags": dict}


def _writes(op: Op | None) -> dict[str, Any] | None:
    """The metrics, params and tags an op logs, if it is one that merges; else None."""
    if not (isinstance(op, dict) and op.get("v") == OP_VERSION and op.get("op") in _MERGEABLE
            and isinstance(op.get("key"), list)):
        return None
    writes = {name: op.get(name, kind()) for name, kind in _SHAPES.items()}
    return writes if all(isinstance(writes[k], kind) for k, kind in _SHAPES.items()) else None


def _joins(group: _Group, batch: Batch, op: Op | None) -> bool:
    """Whether ``op`` merges into ``group`` (its writes are added to ``batch`` if so)."""
    writes = _writes(op)
    first = group.ops[0] if group.ops else op
    if writes is None or op is None or first is None or op["key"] != first["key"]:
        return False
    try:
        return batch.add(**writes)
    except (TypeError, ValueError, IndexError):  # a malformed row: left to a call of its own
        return False


def _front(lines: Iterable[bytes], one: bool = False) -> _Group:
    """The group at the front of ``lines``: the first op and, unless ``one``, the ops right
    after it that log metrics, params or tags to the same run, as many as one ``log_batch``
    call takes (MLflow's async logging queue merges one run's writes the same way)."""
    group, batch = _Group([], []), Batch()
    for line in itertools.islice(lines, _GROUP_OPS):
        op = _decode(line)
        joins = not one and _joins(group, batch, op)
        if group.lines and not joins:
            break
        group.lines.append(line)
        group.ops.append(op)
        if not joins:
            break
    if len(group.ops) > 1:
        group.batch = batch
    return group


@dataclass
class _Verdict:
    """What an attempt at a group means for the ops at the front."""

    done: int = 0                 # ops that are done with: written, or (one) dropped
    applied: int = 0              # of which written
    drop_reason: str | None = None
    answered: bool = False        # MLflow itself answered, whatever it said
    retry_in: float | None = None  # MLflow takes no writes now: try again after this long
    error: str | None = None


class _Policy:
    """The retry rules for the ops at the front, shared by the writer's thread and
    :func:`replay`: exponential backoff with jitter while MLflow does not answer; an op that
    keeps getting a 500 is given up after ``give_up_after`` tries; a merged group MLflow
    refuses is tried again one op at a time, so that only the op it objects to is dropped."""

    def __init__(self, initial_s: float, max_s: float, give_up_after: int) -> None:
        self.initial_s, self.max_s, self.give_up_after = initial_s, max_s, give_up_after
        self.backoff = initial_s
        self.server_errors = 0  # 500s in a row for the op at the front
        self.one_by_one = 0     # ops at the front to write one at a time

    def attempt(self, applier: _Applier, group: _Group) -> _Verdict:
        try:
            applier.apply(group)
        except Exception as exc:
            return self._failed(len(group.lines), _classify(exc), exc)
        return self._done(_Verdict(done=len(group.lines), applied=len(group.lines),
                                   answered=True))

    def _failed(self, size: int, error: str, exc: BaseException) -> _Verdict:
        answered = error != DOWN and not isinstance(exc, _Refused)
        if size > 1 and error != DOWN:
            self.one_by_one = size
            return _Verdict(answered=answered)
        gave_up = error == SERVER_ERROR and self.server_errors + 1 >= self.give_up_after
        if error == REFUSED or gave_up:
            reason = _describe(exc)
            if gave_up:
                reason = f"gave up after {self.server_errors + 1} server errors: {reason}"
            return self._done(_Verdict(done=1, drop_reason=reason, answered=answered))
        self.server_errors += error == SERVER_ERROR
        wait = self.backoff * random.uniform(0.8, 1.2)
        self.backoff = min(self.backoff * 2, self.max_s)
        return _Verdict(retry_in=wait, error=_describe(exc))

    def _done(self, verdict: _Verdict) -> _Verdict:
        self.backoff, self.server_errors = self.initial_s, 0
        self.one_by_one = max(0, self.one_by_one - verdict.done)
        return verdict


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

    def peek(self, limit: int) -> list[bytes]:
        """Up to ``limit`` lines from the front, oldest first (read ahead, not consumed)."""
        while len(self._ahead) < limit and self._read < self._size:
            with open(self.path, "rb") as handle:
                handle.seek(self._read)
                chunk = handle.read(2**20)
                while chunk and b"\n" not in chunk and self._read + len(chunk) < self._size:
                    chunk += handle.read(2**20)
            cut = chunk.rfind(b"\n") + 1
            if not cut:  # pragma: no cover - the file is shorter than counted
                break
            for line in chunk[:cut].split(b"\n")[:-1]:
                self._ahead.append((line, len(line) + 1))
            self._read += cut
        return [line for line, _size in itertools.islice(self._ahead, limit)]

    def pop(self, count: int = 1) -> None:
        """Forget the first ``count`` lines (written or dropped)."""
        for _ in range(count):
            _line, size = self._ahead.popleft()
            self._offset += size
            self.count -= 1
        if count and (self.count == 0 or self._offset >= max(2**20, self._size - self._offset)):
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
    link: str = "up"   # the writer's Link: up, down or closing

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


def _raw(line: bytes) -> Op:
    """What ``dropped.jsonl`` keeps of a journal line that is not an op."""
    return {"raw": line.decode("utf-8", "replace")[:2000]}


class Link(enum.Enum):
    """Where a :class:`TrackingWriter` stands with MLflow. It changes in one place
    (``TrackingWriter._enter``): UP -> DOWN when an attempt finds MLflow not answering (or
    answering 5xx); DOWN -> UP when MLflow answers again, whatever it says; UP or DOWN ->
    CLOSING on :meth:`TrackingWriter.close`, which is final (an outage still shows in
    :attr:`WriterStatus.down_since`)."""

    UP = "up"            # ops are written as they come (a journal left earlier goes first)
    DOWN = "down"        # ops go to the journal; its head is retried with backoff
    CLOSING = "closing"  # write until close()'s deadline, then journal the rest and stop


class TrackingWriter:
    """Writes ops to MLflow in the background, journaling what MLflow cannot take now.

    ``submit`` is safe from any thread and never blocks or raises; ops are applied in the
    order they were submitted, consecutive writes of one run merged into one ``log_batch``
    call. One writer per journal folder: constructing a second one (in any process, while the
    first is open) raises :class:`debias.files.LockHeld`, whose note names the holder. Ops a
    previous writer left in the journal are written first.

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
        self._policy = _Policy(retry_initial_s, retry_max_s, give_up_after)
        self._retry_max_s, self._max_queue = retry_max_s, max_queue
        self._request_timeout_s, self._exit_timeout_s = request_timeout_s, exit_timeout_s
        # Everything below is shared with the callers' threads: read and changed under _cv.
        self._cv = threading.Condition()
        self._link = Link.UP
        self._queue: deque[bytes] = deque()
        self._journaled = self._journal.count
        self._in_flight = 0
        # The drop count status() shows; it changes under the condition together with the
        # pending counters, so nobody sees an op both dropped and still pending.
        self._dropped = self._drops.count
        self._applied = 0
        self._lost = 0
        self._closed = False
        self._close_deadline = math.inf
        self._next_try = 0.0  # when the journal's head may be tried again (monotonic)
        self._wake = False    # try it now (flush, close)
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
                if self._link is Link.CLOSING:
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

    @property
    def link(self) -> Link:
        """Up, down or closing (see :class:`Link`)."""
        with self._cv:
            return self._link

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
                last_error=self._last_error, link=self._link.value)

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
            if self._link is not Link.CLOSING:
                self._close_deadline = time.monotonic() + max(0.0, timeout_s)
                self._wake = True
                self._enter(Link.CLOSING)
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
        while (step := self._next_step()) is not None:
            try:
                step()
            except Exception:  # a bug or a failing disk: say so, keep going, never spin
                self._survive()
        self._finish()

    def _next_step(self) -> Callable[[], None] | None:
        """Wait for work and take it: the journal's head when it is due; else what is queued,
        journaled behind it while the head waits, or written at once when nothing is
        journaled. None: closing, and nothing is left or the time is up."""
        with self._cv:
            while True:
                now = time.monotonic()
                waiting = self._journaled or self._queue
                if self._link is Link.CLOSING and (not waiting or now >= self._close_deadline):
                    return None
                due = self._wake or now >= self._next_try
                if self._journaled and due:
                    self._wake = False
                    return self._drain
                if self._queue and self._journaled:
                    return partial(self._spill, self._take(len(self._queue)))
                if self._queue:
                    self._wake = False
                    group = _front(self._queue, one=self._policy.one_by_one > 0)
                    self._take(len(group.lines))
                    return partial(self._write, group)
                self._cv.wait(self._idle_s(now))

    def _idle_s(self, now: float) -> float | None:
        """Under the condition: how long to wait for news (None: until notified)."""
        until = min(self._next_try if self._journaled else math.inf, self._close_deadline)
        return None if until == math.inf else max(0.0, until - now)

    def _take(self, count: int) -> list[bytes]:
        """Under the condition: the first ``count`` queued ops, now in flight."""
        lines = [self._queue.popleft() for _ in range(count)]
        self._in_flight += count
        return lines

    def _drain(self) -> None:
        """Try the group at the journal's head."""
        group = _front(self._journal.peek(_GROUP_OPS), one=self._policy.one_by_one > 0)
        if not group.lines:  # pragma: no cover - count and file disagree
            with self._cv:
                self._journaled = self._journal.count = 0
            return
        verdict = self._attempt(group)
        self._journal.pop(verdict.done)
        self._settle(verdict)

    def _write(self, group: _Group) -> None:
        """Try a group taken from the queue (nothing is journaled): what is not done goes to
        the journal if MLflow does not answer, else back to the queue's front (split)."""
        verdict = self._attempt(group)
        rest = group.lines[verdict.done:]
        if rest and verdict.retry_in is not None:
            self._spill(rest)
        elif rest:
            with self._cv:
                self._queue.extendleft(reversed(rest))
                self._in_flight -= len(rest)
        self._settle(verdict, in_flight_done=verdict.done)

    def _attempt(self, group: _Group) -> _Verdict:
        verdict = self._policy.attempt(self._applier, group)
        if verdict.drop_reason is not None:
            # Only this thread adds; readers copy the list (atomic under the GIL), so the
            # file write stays outside the condition that submit() takes.
            self._drops.add(group.ops[0] or _raw(group.lines[0]), verdict.drop_reason)
        return verdict

    def _settle(self, verdict: _Verdict, in_flight_done: int = 0) -> None:
        """Count what the attempt did, and move the link."""
        with self._cv:
            self._in_flight -= in_flight_done
            self._journaled = self._journal.count
            self._applied += verdict.applied
            self._dropped = self._drops.count
            if verdict.retry_in is not None:
                self._next_try = time.monotonic() + verdict.retry_in
                self._enter(Link.DOWN, verdict.error)
            elif verdict.answered:
                self._enter(Link.UP)
            self._cv.notify_all()

    def _enter(self, link: Link, error: str | None = None) -> None:
        """Under the condition: the one place the link changes (an outage is logged once
        when it starts and once when it ends; CLOSING is final)."""
        if link is Link.DOWN:
            self._last_error = error
            if self._down_since is None:
                self._down_since = time.time()
                log.warning("MLflow at %s does not take writes now (%s); keeping them in %s "
                            "and retrying in the background", _redact(self.uri),
                            self._last_error, self._journal.path)
        elif link is Link.UP and self._down_since is not None:
            log.warning("MLflow at %s answers again after %.0f s; writing the %d journaled "
                        "write(s)", _redact(self.uri), time.time() - self._down_since,
                        self._journaled)
            self._down_since = None
            self._last_error = None
        if self._link is not Link.CLOSING:
            self._link = link
        self._cv.notify_all()

    def _spill(self, lines: list[bytes]) -> None:
        """Append ops in flight to the journal, in order (or count them lost past the
        bound)."""
        for line in lines:
            try:
                ok = self._journal.append(line)
            except OSError as exc:
                ok = False
                self._warn_once("journal-io", "cannot write the MLflow journal %s (%s): writes "
                                "MLflow cannot take now are lost", self._journal.path, exc)
            with self._cv:
                self._in_flight -= 1
                self._journaled = self._journal.count
                if not ok:
                    self._lost += 1
                    self._warn_once("journal-full", "the MLflow journal %s is full (%d MB): "
                                    "writes MLflow cannot take now are lost until it answers "
                                    "again", self._journal.path, self._journal.max_bytes // 2**20)
                self._cv.notify_all()

    def _survive(self) -> None:
        """After an unexpected error: log it; ops it caught in flight count as lost."""
        log.exception("MLflow writer: unexpected error")
        with self._cv:
            self._lost += self._in_flight
            self._in_flight = 0
            self._cv.notify_all()
        time.sleep(min(1.0, self._retry_max_s))

    def _finish(self) -> None:
        """On close: everything still in memory goes to the journal, which is compacted."""
        with self._cv:
            lines = self._take(len(self._queue))
        self._spill(lines)
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
            drops.add(_raw(line), "unreadable journal line")
        applier = _Applier(uri, experiment, timeout_s=request_timeout_s,
                           artifact_location=artifact_location)
        policy = _Policy(0.5, 30.0, give_up_after=20)
        applied, deadline = 0, time.monotonic() + retry_for_s
        try:
            while lines := journal.peek(_GROUP_OPS):
                group = _front(lines, one=policy.one_by_one > 0)
                verdict = policy.attempt(applier, group)
                if verdict.drop_reason is not None:
                    drops.add(group.ops[0] or _raw(group.lines[0]), verdict.drop_reason)
                journal.pop(verdict.done)
                applied += verdict.applied
                if verdict.retry_in is None:
                    continue
                if time.monotonic() + verdict.retry_in > deadline:
                    log.warning("MLflow at %s does not take writes (%s); %d write(s) stay in %s",
                                _redact(uri), verdict.error, journal.count, journal.path)
                    break
                time.sleep(verdict.retry_in)
        finally:
            journal.compact()
        return applied
    finally:
        lock.release()
