"""MLflow under the names DESIGN.md fixes: reading a sweep's runs back, and the few writes
made after it (the report's numbers, plots and table on the parent runs).

What a *running* sweep writes goes through :mod:`debias.sweep_log` (a journaled background
writer that survives tracking outages); this module is the record's reader, used by the
report, the plots, ``--compare`` and ``--export``, and holds the names both share.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from debias.environment import redact_uri

if TYPE_CHECKING:  # MLflow takes ~1 s to import; a trial process reads only the names here
    import mlflow

__all__ = ["ARTIFACT_PREFIX", "BEST_PREFIX", "BEST_SCORE", "FAILURE_KEY", "FINAL_PREFIXES",
           "IGNORED_PREFIXES", "NOTE_PREFIX", "ROLE_TAG", "STAGE_PREFIX", "SWEEP_ID_TAG",
           "StoreNotReady", "Tracker", "best_as_params", "best_of_params", "flatten",
           "open_store", "redact_uri"]

#: Every `group/name` result key is forwarded each epoch (train/, val/, the method's own such as
#: clusterfix/, cache/), except test metrics and the selection, which are logged at the end,
#: and Ray's own bookkeeping.
FINAL_PREFIXES = ("test/", "selected/")
IGNORED_PREFIXES = ("config/",)
#: A result key `artifacts/<name>` holding a folder: its files become the run's artifacts
#: under `<name>/` (e.g. SLIM's GradCAM overlays), logged once, when the key first appears.
ARTIFACT_PREFIX = "artifacts/"
ROLE_TAG = "debias.role"
#: A result key ``stage/<name>`` holding a string: the cache key of a shared stage the trial
#: used, set as a tag on its run.
STAGE_PREFIX = "stage/"
#: A result key ``note/<name>`` holding a string: set as the tag ``<name>`` on the trial's run
#: (e.g. ``note/checkpoint``: which checkpoint a trial restarted from, and why).
NOTE_PREFIX = "note/"
#: The tag naming the sweep (its id, kept across --resume) a run belongs to.
SWEEP_ID_TAG = "debias.sweep_id"
#: How long opening a store waits out another program creating it.
STORE_OPEN_S = 60.0
#: How long a migration's leftover temporary table must stay before it counts as abandoned.
STALE_MIGRATION_S = 5.0
#: A result key holding the cause of a failure the trial itself recognised as deterministic
#: (a bad file, a missing key): it ends the trial without Tune's retries.
FAILURE_KEY = "failure"


class StoreNotReady(RuntimeError):
    """The tracking store could not be opened (initialised) in time; the message says why."""


def open_store(uri: str, timeout_s: float = STORE_OPEN_S) -> None:
    """Open the tracking store once, creating its tables if it is new, before anything else
    of the sweep touches it.

    Two programs creating one new SQL store at once race MLflow's migrations (alembic's
    ``Online migration expected to match one row``, SQLAlchemy's ``CircularDependencyError``,
    ``table ... already exists``), and the loser's writes were dropped. A new ``sqlite:///``
    store is therefore created under a lock of the sweep's own beside the file (every
    sweep takes it), and also MLflow's own initialisation lock; whatever still races (an
    ``mlflow ui`` or a script opening the file meanwhile, two machines creating one
    PostgreSQL database) is retried with backoff until ``timeout_s``, then refused as one
    :class:`StoreNotReady`. ``http(s)://`` stores are the server's business: nothing to do."""
    import hashlib
    import random
    import tempfile

    from debias.environment import sqlite_path
    from debias.files import locked

    scheme = uri.partition(":")[0].lower().partition("+")[0]
    if scheme in ("http", "https", "databricks", "file", ""):
        return
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    path = sqlite_path(uri)
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    stale_since: float | None = None
    while True:
        try:
            if path is None:
                _initialise(uri)
                return
            with locked(path.with_name(f".{path.name}.debias-init.lock")):
                # MLflow's own lock for initialising this database (its jobs store, an
                # `mlflow server` on the same file, take it; its tracking store does not).
                digest = hashlib.md5(f"sqlite:///{path}".encode(),
                                     usedforsecurity=False).hexdigest()
                with locked(Path(tempfile.gettempdir()) / f"db_init_lock-{digest}"):
                    _initialise(uri)
            return
        except Exception as exc:  # a migration racing another program's, a locked file
            if path is not None and "_alembic_tmp_" in str(exc):
                stale_since = stale_since or time.monotonic()
                if time.monotonic() - stale_since > STALE_MIGRATION_S:
                    _drop_alembic_leftovers(path)
                    stale_since = None
            if time.monotonic() + delay > deadline:
                text = redact_uri(str(exc).strip().splitlines()[0] if str(exc).strip()
                                  else type(exc).__name__)[:300]
                raise StoreNotReady(
                    f"tracking.uri: the MLflow store {redact_uri(uri)} could not be opened "
                    f"within {timeout_s:.0f} s ({type(exc).__name__}: {text}); another "
                    "program may be creating or migrating it (an `mlflow ui`, another "
                    "sweep): let it finish, then run the command again") from None
            time.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 5.0)


def _drop_alembic_leftovers(path: Path) -> None:
    """Drop the ``_alembic_tmp_*`` tables a migration left behind: on SQLite, alembic's batch
    operations (copy into a temporary table, drop, rename) are not one transaction, so a
    program that dies or fails mid-way (another one migrating the same new file) leaves the
    temporary table, and every later migration stops on it (``table _alembic_tmp_tags
    already exists``). Called only after that error has persisted ``STALE_MIGRATION_S``, far
    longer than a batch operation on a new store takes."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        names = [r[0] for r in tables if str(r[0]).startswith("_alembic_tmp_")]
        for name in names:
            db.execute(f'DROP TABLE IF EXISTS "{name}"')
        db.commit()
    if names:
        logging.getLogger("debias").warning(
            "tracking store %s: dropped %s, left by a migration that did not finish", path,
            ", ".join(names))


def _initialise(uri: str) -> None:
    """MLflow's SQL store on ``uri``: its constructor creates and migrates the tables of a
    new database (and checks an existing one's schema)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # Only opened here: runs get their experiment's artifact location, not this root.
    root = Path(uri[len("sqlite:///"):]).absolute().parent if uri.startswith("sqlite:///") \
        else Path.cwd()
    SqlAlchemyStore(uri, str(root / "mlartifacts"))


#: A parent run's best config is logged as params ``best.<dotted key>`` (e.g.
#: ``best.clusterfix.k``), its validation score as ``best.score``: written by
#: :func:`best_as_params`, read back by :func:`best_of_params` (the report and the plots).
BEST_PREFIX = "best."
BEST_SCORE = "best.score"


def best_as_params(best: Mapping[str, Any]) -> dict[str, Any]:
    """A search's best config (dotted keys) as the parent run's params."""
    return {f"{BEST_PREFIX}{k}": v for k, v in best.items()}


def best_of_params(params: Mapping[str, str]) -> dict[str, str]:
    """The best config (dotted keys -> the values as MLflow holds them) of a parent run's
    params; empty before its search is done."""
    return {k[len(BEST_PREFIX):]: v for k, v in params.items()
            if k.startswith(BEST_PREFIX) and k != BEST_SCORE}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        else:
            out[path] = str(value)
    return out


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Tracker:
    """Parent runs (one per target) and child runs (one per Ray trial) of one sweep."""

    def __init__(self, uri: str, experiment: str, create: bool = True) -> None:
        # "Creating initial MLflow database tables..." tells a user nothing.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None and not create:
            raise LookupError(f"no MLflow experiment {experiment!r} at {redact_uri(uri)}")
        if found is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.experiment = experiment

    # ------------------------------------------------------------------ lookups

    def _search(self, filter_string: str) -> list[mlflow.entities.Run]:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       max_results=10_000)

    def parent_runs(self) -> dict[str, mlflow.entities.Run]:
        """{pipeline name: parent run}: the target (one method), or ``method/target`` in a
        study. The study's own parent (role ``study``) is not among them."""
        runs = self._search(f"tags.`{ROLE_TAG}` = 'parent'")
        return {r.info.run_name: r for r in runs}

    def child_runs(self, parent_id: str, phase: str | None = None) -> list[mlflow.entities.Run]:
        query = f"tags.`mlflow.parentRunId` = '{parent_id}'"
        if phase:
            query += f" and tags.phase = '{phase}'"
        return self._search(query)

    # ------------------------------------------------------------------ parents

    def open_study(self, tags: Mapping[str, str]) -> str:
        """The study-level parent run of a multi-method sweep (one per experiment), which
        carries the comparison table and plot."""
        found = self._search(f"tags.`{ROLE_TAG}` = 'study'")
        if found:
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name="study", tags={
            ROLE_TAG: "study", **tags})
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
        for chunk in _chunks(batch, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def errors(self, parent_id: str, limit: int = 3) -> str:
        """The causes of a pipeline's failed trials, for one message."""
        runs = [r for r in self.child_runs(parent_id) if r.info.status == "FAILED"]
        causes = [_last_line(r.data.tags.get("error", "")) for r in runs[:limit]]
        return "; ".join(c for c in causes if c) or "no error was recorded"

    # ------------------------------------------------------------------ children

    def find_child(self, parent_id: str, phase: str, trial_id: str) -> mlflow.entities.Run | None:
        for run in self.child_runs(parent_id, phase):
            if run.data.tags.get("ray_trial_id") == trial_id:
                return run
        return None

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
