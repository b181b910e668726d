"""MLflow as the tracking writer reaches it: the one module an MLflow release can break.

:mod:`debias.tracking_writer` (and a sweep's claim refreshing its experiment tag,
:mod:`debias.claim`) need a few things MLflow's public client does not give:

- **One attempt per request, with a short timeout, over HTTP.** ``MlflowClient`` retries a
  request for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, with a 2 s backoff
  factor; ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 120 s per attempt), and those settings are
  environment variables read on every request: setting them would change every MLflow client
  of the process, including the sweep's synchronous lookups that rely on them to ride out a
  short restart. So for an ``http(s)://`` URI this module speaks MLflow's REST API
  (``/api/2.0/mlflow/...``, documented, and kept stable across 2.x and 3.x because older
  clients must keep working) through MLflow's own ``http_request`` (so MLflow's auth, TLS
  settings and headers apply), passing ``max_retries=0`` and ``timeout``, which win over the
  environment. The writer's own backoff, which holds no one up, does the retrying.
- **"Not now" told from "never"** (:func:`classify`): an HTTP status read straight from the
  answer (a 4xx other than 408/429 is a refusal; 500 may be the op's fault; other 5xx, 408,
  429 mean "later"), a connection that fails, SQLite busy, a database server gone.
- **Artifacts through the tracking server's proxy** (``mlflow-artifacts:`` URIs, MLflow's
  default for a server), listed and uploaded with the same one-attempt rule.
- **The limits of one ``log_batch`` call** (:data:`LIMITS`), so that the writer can merge
  consecutive writes of one run into as few calls as MLflow takes (:class:`Batch`).

Every other store (``sqlite:///``, ``postgresql://``, a ``file:`` folder) is reached through
the public ``MlflowClient`` (local stores have no HTTP retries to avoid). The reaches outside
MLflow's public API, all here: ``mlflow.utils.rest_utils.http_request``,
``mlflow.utils.credentials.get_default_host_creds`` and, for artifacts a server does not proxy
(an object store it names), ``mlflow.store.artifact.artifact_repository_registry.
get_artifact_repository``; the REST endpoints and their JSON are MLflow's documented REST API.
``tests/test_mlflow_adapter.py`` runs both backends against a real store and a real
``mlflow server``; it passes with MLflow 3.17 (the oldest ``pyproject.toml`` admits, the
version the whole suite runs) and, before the experiment-tag calls, passed with 2.16.0 under
SQLAlchemy < 2.1 (2.16 cannot open a SQL store with SQLAlchemy 2.1, so it is not admitted).
"""

from __future__ import annotations

import json
import math
import mimetypes
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse, urlunparse

__all__ = [
    "DOWN", "LIMITS", "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "REFUSED", "SERVER_ERROR", "Backend",
    "Batch", "ExperimentRecord", "Limits", "MetricRow", "RunRecord", "ServerAnswered",
    "batches", "classify", "connect",
]

#: A metric row as the writer's ops hold it: (name, value, timestamp in ms, step).
MetricRow = tuple[str, float, int, int]

#: MLflow's length limits for values (``mlflow.utils.validation``): params 6000 characters
#: since 2.x; tags 8000 in 3.x (2.x cuts a longer tag to its 5000 itself, with a warning).
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000


@dataclass(frozen=True)
class Limits:
    """What one ``log_batch`` call may hold (``mlflow.utils.validation``, the same in 2.16 and
    3.x: ``MAX_METRICS_PER_BATCH``, ``MAX_PARAMS_TAGS_PER_BATCH``, ``MAX_ENTITIES_PER_BATCH``,
    ``MAX_BATCH_LOG_REQUEST_SIZE``); a request past one is refused with a 400."""

    metrics: int = 1000
    params: int = 100
    tags: int = 100
    entities: int = 1000
    request_bytes: int = 1_000_000

    def allow(self, metrics: int, params: int, tags: int, request_bytes: int) -> bool:
        """Whether one call may hold this many of each, in a request of this size."""
        return metrics <= self.metrics and params <= self.params and tags <= self.tags and \
            metrics + params + tags <= self.entities and request_bytes <= self.request_bytes


LIMITS = Limits()

#: The outcome classes of :func:`classify`.
DOWN, SERVER_ERROR, REFUSED = "down", "server_error", "refused"

_API = "/api/2.0/mlflow"
_ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


# ---------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ExperimentRecord:
    experiment_id: str
    lifecycle_stage: str


@dataclass(frozen=True)
class RunRecord:
    """What the writer reads of a run."""

    run_id: str
    status: str
    lifecycle_stage: str
    artifact_uri: str
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- errors


class ServerAnswered(Exception):
    """An MLflow server answered with something other than success: ``status`` is the HTTP
    status, ``error_code`` MLflow's (e.g. ``INVALID_PARAMETER_VALUE``) when it sent one."""

    def __init__(self, status: int, endpoint: str, error_code: str, message: str) -> None:
        super().__init__(f"MLflow answered {status} to {endpoint}: {error_code}: "
                         f"{message[:500]}")
        self.status = status
        self.error_code = error_code

    @classmethod
    def of(cls, response: Any, endpoint: str) -> ServerAnswered:
        text = response.text or ""
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return cls(response.status_code, endpoint, "", text)
        return cls(response.status_code, endpoint, str(body.get("error_code", "")),
                   str(body.get("message", text)))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _by_status(status: int) -> str:
    if status in (408, 429) or status > 500:
        return DOWN
    if 400 <= status < 500:
        return REFUSED
    return SERVER_ERROR  # 500, or a success whose body is not MLflow's


def classify(exc: BaseException) -> str:
    """DOWN: MLflow did not answer or said "not now" (retry with backoff, for ever).
    SERVER_ERROR: it answered 500, or a local store failed with an I/O error (retry, but
    give up after a while: it may be this write that breaks it). REFUSED: it will never
    succeed as it is (a 4xx, a bad URL, anything unforeseen)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, ServerAnswered):
        return _by_status(exc.status)
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
        return _by_status(exc.get_http_status_code())
    if isinstance(exc, OSError):
        return SERVER_ERROR  # a full or unreachable artifact disk: may clear up, may not
    return REFUSED


# ---------------------------------------------------------------------------------- batches


def _json_len(value: Any) -> int:
    return len(json.dumps(value))


def _metric_bytes(row: MetricRow) -> int:
    return _json_len(row[0]) + 80  # {"key":..,"value":..,"timestamp":..,"step":..},


def _pair_bytes(key: str, value: str) -> int:
    return _json_len(key) + _json_len(value) + 20  # {"key":..,"value":..},


class Batch:
    """Metrics, params and tags of one run that one ``log_batch`` call takes.

    :meth:`add` merges the writes of another op when the result stays within ``limits`` and
    means what applying the ops one after the other means: an identical metric row is kept
    once (MLflow's SQL store drops it anyway), a tag set twice keeps its last value, and a
    param set twice must have one value (a second value is refused by MLflow, so it is left
    to a call of its own, where the refusal names it)."""

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.limits = limits
        self.metrics: dict[MetricRow, None] = {}  # ordered, without repeats
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.bytes = 100  # the request around the lists

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def add(self, metrics: Iterable[Sequence[Any]] = (), params: Mapping[str, str] | None = None,
            tags: Mapping[str, str] | None = None) -> bool:
        """Merge these writes and return True, or change nothing and return False."""
        rows = {(str(m[0]), float(m[1]), int(m[2]), int(m[3])): None for m in metrics}
        rows = {r: None for r in rows if r not in self.metrics}
        params, tags = dict(params or {}), dict(tags or {})
        if any(self.params.get(k, v) != v for k, v in params.items()):
            return False
        params = {k: v for k, v in params.items() if k not in self.params}
        size = self.bytes + self._growth(rows, params, tags)
        if not self.limits.allow(len(self.metrics) + len(rows), len(self.params) + len(params),
                                 len(self.tags.keys() | tags.keys()), size):
            return False
        self.metrics.update(rows)
        self.params.update(params)
        self.tags.update(tags)
        self.bytes = size
        return True

    def _growth(self, rows: Iterable[MetricRow], params: Mapping[str, str],
                tags: Mapping[str, str]) -> int:
        """How much larger the request gets (a tag set again replaces its value)."""
        grown = sum(map(_metric_bytes, rows)) + sum(_pair_bytes(k, v) for k, v in params.items())
        for k, v in tags.items():
            grown += _pair_bytes(k, v) - (_pair_bytes(k, self.tags[k]) if k in self.tags else 0)
        return grown


def batches(metrics: Iterable[Sequence[Any]] = (), params: Mapping[str, str] | None = None,
            tags: Mapping[str, str] | None = None, limits: Limits = LIMITS) -> Iterator[Batch]:
    """These writes as few batches within ``limits`` as greedily fit (none when empty)."""
    batch = Batch(limits)
    pieces: list[dict[str, Any]] = [{"params": {k: v}} for k, v in (params or {}).items()]
    pieces += [{"tags": {k: v}} for k, v in (tags or {}).items()]
    pieces += [{"metrics": [m]} for m in metrics]
    for piece in pieces:
        if not batch.add(**piece):
            if len(batch):
                yield batch
            batch = Batch(limits)
            if not batch.add(**piece):  # pragma: no cover - one value past 1 MB
                raise ValueError("a single MLflow write is larger than one request may be")
    if len(batch):
        yield batch


# ---------------------------------------------------------------------------------- backends


class Backend(Protocol):
    """What the writer asks of a tracking store. Errors are the store's own (see
    :func:`classify`); nothing here retries."""

    #: The store appends an identical metric row again (the deprecated file store), where
    #: the SQL stores drop it: the writer then checks the history itself.
    keeps_repeated_metric_rows: bool

    def find_experiment(self, name: str) -> ExperimentRecord | None: ...

    def create_experiment(self, name: str, artifact_location: str | None) -> str: ...

    def search_runs(self, experiment_id: str, filter_string: str,
                    max_results: int) -> list[RunRecord]:
        """Active runs matching ``filter_string``, oldest first."""
        ...

    def get_run(self, run_id: str) -> RunRecord: ...

    def create_run(self, experiment_id: str, *, name: str, start_time: int,
                   tags: Mapping[str, str]) -> RunRecord: ...

    def log_batch(self, run_id: str, batch: Batch) -> None:
        """One call; ``batch`` is within :data:`LIMITS` (see :func:`batches`)."""
        ...

    def set_status(self, run_id: str, status: str, end_time: int | None) -> None:
        """RUNNING (reopen, end time kept) or a terminal status at ``end_time``."""
        ...

    def metric_history(self, run_id: str, key: str) -> list[MetricRow]: ...

    def artifact_sizes(self, run_id: str, folder: str | None) -> dict[str, int | None]:
        """The files (not folders) directly in ``folder`` of the run's artifacts: name ->
        size in bytes (None when the store does not say)."""
        ...

    def upload_artifact(self, run_id: str, local: Path, folder: str | None) -> None: ...

    def experiment_tags(self, experiment_id: str) -> dict[str, str]: ...

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None: ...

    def delete_experiment_tag(self, experiment_id: str, key: str) -> None: ...


def connect(uri: str, timeout_s: float) -> Backend:
    """The backend for ``uri``: MLflow's REST API, one attempt of at most ``timeout_s`` per
    request, for an ``http(s)://`` server; the public ``MlflowClient`` for any other store
    (which it opens now: an error here means the store cannot be opened yet)."""
    if uri.startswith(("http://", "https://")):
        return _RestBackend(uri, timeout_s)
    return _ClientBackend(uri)


def _record(run: Any) -> RunRecord:
    info = run.info
    return RunRecord(info.run_id, info.status, info.lifecycle_stage, info.artifact_uri or "",
                     dict(run.data.tags), dict(run.data.params))


class _ClientBackend:
    """A local or database store through the public ``MlflowClient``."""

    def __init__(self, uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)  # opens the store (creates its tables)
        self.keeps_repeated_metric_rows = urlparse(uri).scheme in ("", "file")

    def find_experiment(self, name: str) -> ExperimentRecord | None:
        found = self.client.get_experiment_by_name(name)
        return ExperimentRecord(found.experiment_id, found.lifecycle_stage) if found else None

    def create_experiment(self, name: str, artifact_location: str | None) -> str:
        return self.client.create_experiment(name, artifact_location=artifact_location)

    def search_runs(self, experiment_id: str, filter_string: str,
                    max_results: int) -> list[RunRecord]:
        from mlflow.entities import ViewType

        return [_record(r) for r in self.client.search_runs(
            [experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=max_results,
            order_by=["attributes.start_time ASC"])]

    def get_run(self, run_id: str) -> RunRecord:
        return _record(self.client.get_run(run_id))

    def create_run(self, experiment_id: str, *, name: str, start_time: int,
                   tags: Mapping[str, str]) -> RunRecord:
        return _record(self.client.create_run(experiment_id, start_time=start_time,
                                              tags=dict(tags), run_name=name))

    def log_batch(self, run_id: str, batch: Batch) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(run_id, metrics=[Metric(*row) for row in batch.metrics],
                              params=[Param(k, v) for k, v in batch.params.items()],
                              tags=[RunTag(k, v) for k, v in batch.tags.items()],
                              synchronous=True)

    def set_status(self, run_id: str, status: str, end_time: int | None) -> None:
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status, end_time=end_time)

    def metric_history(self, run_id: str, key: str) -> list[MetricRow]:
        return [(m.key, m.value, m.timestamp, m.step)
                for m in self.client.get_metric_history(run_id, key)]

    def artifact_sizes(self, run_id: str, folder: str | None) -> dict[str, int | None]:
        return {posixpath.basename(f.path): f.file_size
                for f in self.client.list_artifacts(run_id, folder) if not f.is_dir}

    def upload_artifact(self, run_id: str, local: Path, folder: str | None) -> None:
        self.client.log_artifact(run_id, str(local), folder)

    def experiment_tags(self, experiment_id: str) -> dict[str, str]:
        return dict(self.client.get_experiment(experiment_id).tags)

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self.client.set_experiment_tag(experiment_id, key, value)

    def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        self.client.delete_experiment_tag(experiment_id, key)


def _host_creds(uri: str) -> Any:
    from mlflow.utils.credentials import get_default_host_creds

    return get_default_host_creds(uri)


def _pairs(items: Any) -> dict[str, str]:
    return {str(p["key"]): str(p.get("value", "")) for p in items or ()}


def _run_of(body: Mapping[str, Any]) -> RunRecord:
    info, data = body.get("info", {}), body.get("data", {})
    return RunRecord(str(info.get("run_id") or info.get("run_uuid")),
                     str(info.get("status", "RUNNING")), str(info.get("lifecycle_stage", "active")),
                     str(info.get("artifact_uri", "")), _pairs(data.get("tags")),
                     _pairs(data.get("params")))


def _number(value: float) -> float | str:
    """A metric value as MLflow's REST API (protobuf JSON) spells it: infinities as strings."""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


class _RestBackend:
    """An MLflow server through its REST API, each request made once within ``timeout_s``."""

    keeps_repeated_metric_rows = False  # the server's store decides; SQL stores drop repeats

    def __init__(self, uri: str, timeout_s: float) -> None:
        self.uri = uri.rstrip("/")
        self.timeout_s = timeout_s
        self._artifact_uris: dict[str, str] = {}

    def _call(self, method: str, endpoint: str, body: Mapping[str, Any] | None = None, *,
              host: str | None = None, **kwargs: Any) -> dict[str, Any]:
        from mlflow.utils.rest_utils import http_request

        if body is not None:
            kwargs["params" if method == "GET" else "json"] = body
        response = http_request(_host_creds(host or self.uri), endpoint, method,
                                max_retries=0, backoff_factor=0, backoff_jitter=0,
                                timeout=self.timeout_s, raise_on_status=False, **kwargs)
        if response.status_code != 200:
            raise ServerAnswered.of(response, endpoint)
        if not (response.text or "").strip():
            return {}
        try:
            answer = json.loads(response.text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServerAnswered(200, endpoint, "", f"not MLflow's answer: {response.text[:200]}")
        return answer

    def find_experiment(self, name: str) -> ExperimentRecord | None:
        try:
            found = self._call("GET", f"{_API}/experiments/get-by-name",
                               {"experiment_name": name})["experiment"]
        except ServerAnswered as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return ExperimentRecord(str(found["experiment_id"]),
                                str(found.get("lifecycle_stage", "active")))

    def create_experiment(self, name: str, artifact_location: str | None) -> str:
        body = {"name": name}
        if artifact_location:
            body["artifact_location"] = artifact_location
        return str(self._call("POST", f"{_API}/experiments/create", body)["experiment_id"])

    def search_runs(self, experiment_id: str, filter_string: str,
                    max_results: int) -> list[RunRecord]:
        answer = self._call("POST", f"{_API}/runs/search", {
            "experiment_ids": [experiment_id], "filter": filter_string,
            "run_view_type": "ACTIVE_ONLY", "max_results": max_results,
            "order_by": ["attributes.start_time ASC"]})
        return [_run_of(r) for r in answer.get("runs", ())]

    def get_run(self, run_id: str) -> RunRecord:
        return _run_of(self._call("GET", f"{_API}/runs/get", {"run_id": run_id})["run"])

    def create_run(self, experiment_id: str, *, name: str, start_time: int,
                   tags: Mapping[str, str]) -> RunRecord:
        return _run_of(self._call("POST", f"{_API}/runs/create", {
            "experiment_id": experiment_id, "user_id": tags.get("mlflow.user", "unknown"),
            "start_time": start_time, "run_name": name,
            "tags": [{"key": k, "value": v} for k, v in tags.items()]})["run"])

    def log_batch(self, run_id: str, batch: Batch) -> None:
        self._call("POST", f"{_API}/runs/log-batch", {
            "run_id": run_id,
            "metrics": [{"key": k, "value": _number(v), "timestamp": t, "step": s}
                        for k, v, t, s in batch.metrics],
            "params": [{"key": k, "value": v} for k, v in batch.params.items()],
            "tags": [{"key": k, "value": v} for k, v in batch.tags.items()]})

    def set_status(self, run_id: str, status: str, end_time: int | None) -> None:
        body: dict[str, Any] = {"run_id": run_id, "status": status}
        if end_time is not None:
            body["end_time"] = end_time
        self._call("POST", f"{_API}/runs/update", body)

    def metric_history(self, run_id: str, key: str) -> list[MetricRow]:
        rows: list[MetricRow] = []
        token = None
        while True:
            query = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                query["page_token"] = token
            answer = self._call("GET", f"{_API}/metrics/get-history", query)
            rows += [(m["key"], float(m["value"]), int(m.get("timestamp", 0)),
                      int(m.get("step", 0))) for m in answer.get("metrics", ())]
            token = answer.get("next_page_token")
            if not token:
                return rows

    # --------------------------------------------------------------- artifacts

    def _proxy(self, run_id: str) -> tuple[str, str] | None:
        """(the server's base URL, the run's root under the proxy) when the server proxies
        the run's artifacts, resolved as MLflow resolves ``mlflow-artifacts:`` URIs."""
        if run_id not in self._artifact_uris:
            self._artifact_uris[run_id] = self.get_run(run_id).artifact_uri
        uri = self._artifact_uris[run_id]
        parsed = urlparse(uri)
        if parsed.scheme == "mlflow-artifacts":
            track = urlparse(self.uri)
            base = urlunparse((track.scheme, parsed.netloc or track.netloc,
                               track.path.rstrip("/"), "", "", ""))
            return base, parsed.path.strip("/")
        if parsed.scheme in ("http", "https") and _ARTIFACTS in uri:
            base, tail = uri.split(_ARTIFACTS, maxsplit=1)
            return base, tail.strip("/")
        return None

    def _repository(self, run_id: str) -> Any:
        """An artifact store the server only names (an object store): MLflow's repository."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        uri = self._artifact_uris[run_id]
        try:
            return get_artifact_repository(uri, tracking_uri=self.uri)
        except TypeError:  # MLflow 2.x takes only the URI
            return get_artifact_repository(uri)

    def artifact_sizes(self, run_id: str, folder: str | None) -> dict[str, int | None]:
        proxy = self._proxy(run_id)
        if proxy is None:
            return {posixpath.basename(f.path): f.file_size
                    for f in self._repository(run_id).list_artifacts(folder) if not f.is_dir}
        base, root = proxy
        path = posixpath.join(root, folder) if folder else root
        answer = self._call("GET", _ARTIFACTS, {"path": path}, host=base)
        return {posixpath.basename(f["path"]): int(f["file_size"]) if "file_size" in f else None
                for f in answer.get("files", ()) if not f.get("is_dir")}

    def upload_artifact(self, run_id: str, local: Path, folder: str | None) -> None:
        proxy = self._proxy(run_id)
        if proxy is None:
            self._repository(run_id).log_artifact(str(local), folder)
            return
        base, root = proxy
        path = posixpath.join(*(p for p in (root, folder, local.name) if p))
        mime = mimetypes.guess_type(local.name)[0] or "application/octet-stream"
        with open(local, "rb") as handle:
            self._call("PUT", f"{_ARTIFACTS}/{path}", host=base, data=handle,
                       extra_headers={"Content-Type": mime})

    def experiment_tags(self, experiment_id: str) -> dict[str, str]:
        found = self._call("GET", f"{_API}/experiments/get",
                           {"experiment_id": experiment_id})["experiment"]
        return _pairs(found.get("tags", ()))

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self._call("POST", f"{_API}/experiments/set-experiment-tag",
                   {"experiment_id": experiment_id, "key": key, "value": value})

    def delete_experiment_tag(self, experiment_id: str, key: str) -> None:
        self._call("POST", f"{_API}/experiments/delete-experiment-tag",
                   {"experiment_id": experiment_id, "key": key})
