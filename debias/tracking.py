"""MLflow under the names DESIGN.md fixes: reading a sweep's runs back, and the few writes
made after it (the report's numbers, plots and table on the parent runs).

What a *running* sweep writes goes through :mod:`debias.sweep_log` (a journaled background
writer that survives tracking outages); this module is the record's reader, used by the
report, the plots, ``--compare`` and ``--export``, and holds the names both share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from debias.environment import redact_uri

if TYPE_CHECKING:  # MLflow takes ~1 s to import; a trial process reads only the names here
    import mlflow

__all__ = ["ARTIFACT_PREFIX", "FAILURE_KEY", "FINAL_PREFIXES", "IGNORED_PREFIXES", "ROLE_TAG",
           "STAGE_PREFIX",
           "Tracker", "flatten", "redact_uri"]

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
#: A result key holding the cause of a failure the trial itself recognised as deterministic
#: (a bad file, a missing key): it ends the trial without Tune's retries.
FAILURE_KEY = "failure"


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
