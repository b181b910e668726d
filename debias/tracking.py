"""MLflow tracking under the names DESIGN.md fixes, written only by the sweep's driver.

Only the driver talks to MLflow: trials report to Ray, and a Tune callback forwards their
results. That keeps the tracking server off the trials' hot path, means worker nodes never
need to reach it, and gives one writer, which is what makes resume exact: every child run is
found again by its `(phase, ray_trial_id)` tags instead of being created twice, and the last
step it logged tells which results are new. After each phase, :meth:`Tracker.reconcile`
makes MLflow agree with Ray's own record of the trials, so a driver killed between a trial
finishing and its run being closed leaves nothing stuck in RUNNING.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from debias.spec import config_hash, with_params

__all__ = ["MlflowTrialCallback", "Tracker", "flatten", "redact_uri"]

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


def redact_uri(uri: str) -> str:
    """Hide credentials (`user:password@`) before a tracking URI is printed or logged."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


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

    def open_parent(self, name: str, tags: Mapping[str, str]) -> str:
        """A pipeline's parent run (named ``target`` or ``method/target``), reused on resume
        (set back to RUNNING)."""
        existing = self.parent_runs().get(name)
        if existing is not None:
            self.client.update_run(existing.info.run_id, status="RUNNING")
            return existing.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            ROLE_TAG: "parent", **tags})
        return run.info.run_id

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
        stamp = int(time.time() * 1000)
        batch = [Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
        for chunk in _chunks(batch, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def close_parent(self, run_id: str, best_params: Mapping[str, Any], best_run_id: str) -> None:
        params = [Param(f"best.{k}", str(v)) for k, v in sorted(best_params.items())]
        existing = self.client.get_run(run_id).data.params
        params = [p for p in params if p.key not in existing]
        for chunk in _chunks(params, 100):
            self.client.log_batch(run_id, params=chunk)
        self.client.set_tag(run_id, "best_run_id", best_run_id)
        self.client.set_terminated(run_id, "FINISHED")

    # ------------------------------------------------------------------ children

    def find_child(self, parent_id: str, phase: str, trial_id: str) -> mlflow.entities.Run | None:
        for run in self.child_runs(parent_id, phase):
            if run.data.tags.get("ray_trial_id") == trial_id:
                return run
        return None

    def open_child(self, parent_id: str, phase: str, trial_id: str,
                   config: Mapping[str, Any]) -> tuple[str, int]:
        """Find or create the trial's run; returns (run_id, last epoch already logged)."""
        run = self.find_child(parent_id, phase, trial_id)
        if run is not None:
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id, self._last_step(run.info.run_id)
        run = self.client.create_run(self.experiment_id, run_name=f"{phase}-{trial_id}", tags={
            "mlflow.parentRunId": parent_id,
            ROLE_TAG: "trial",
            "phase": phase,
            "ray_trial_id": trial_id,
            "seed": str(config["seed"]),
            "method": str(config["method"]),
            "config_hash": config_hash(config),
            "target_attribute": config["target"],
            "bias_attribute": config["bias"],
        })
        params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
        for chunk in _chunks(params, 100):
            self.client.log_batch(run.info.run_id, params=chunk)
        return run.info.run_id, 0

    def _last_step(self, run_id: str) -> int:
        history = self.client.get_metric_history(run_id, "train/loss")
        return max((m.step for m in history), default=0)

    def log_epoch(self, run_id: str, result: Mapping[str, Any], final: bool = False) -> None:
        step = int(result.get("epoch", 0))
        stamp = int(float(result.get("timestamp", 0)) * 1000)
        metrics = [Metric(k, float(v), stamp, step) for k, v in result.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)
                   and not math.isnan(float(v))
                   and "/" in k and not k.startswith(IGNORED_PREFIXES)
                   and (final or not k.startswith(FINAL_PREFIXES))]
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def close_child(self, run_id: str, status: str, error: str | None = None) -> None:
        if error:
            self.client.set_tag(run_id, "error", error[-5000:])
        self.client.set_terminated(run_id, status)

    # ------------------------------------------------------------------ repair

    def reconcile(self, parent_id: str, phase: str, base: Mapping[str, Any],
                  grid: tune.ResultGrid) -> None:
        """Make MLflow agree with Ray's record of a finished phase: create runs the driver
        never logged, add missing epochs, close runs left RUNNING, mark orphans KILLED."""
        known: set[str] = set()
        for result in grid:
            trial_id = result.metrics.get("trial_id") if result.metrics else None
            if trial_id is None:
                trial_id = Path(result.path).name.rsplit("_", 1)[-1] if result.path else None
            if trial_id is None:
                continue
            known.add(trial_id)
            existing = self.find_child(parent_id, phase, trial_id)
            if existing is not None and existing.info.status in ("FINISHED", "FAILED"):
                continue
            config = with_params(base, result.config)
            run_id, last = self.open_child(parent_id, phase, trial_id, config)
            history = result.metrics_dataframe
            if history is not None and len(history):
                for row in history.to_dict("records"):
                    if int(row.get("epoch", 0)) > last:
                        self.log_epoch(run_id, {**row, "method": base["method"]})
            if result.error is not None:
                self.close_child(run_id, "FAILED", repr(result.error))
            else:
                if result.metrics:
                    self.log_epoch(run_id, {**result.metrics, "method": base["method"]},
                                   final=True)
                self.close_child(run_id, "FINISHED")
        for run in self.child_runs(parent_id, phase):
            if run.data.tags.get("ray_trial_id") not in known and run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, "note", "orphaned: no Ray trial resumed it")
                self.client.set_terminated(run.info.run_id, "KILLED")

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))


class MlflowTrialCallback(tune.Callback):
    """Forwards each trial's results to its child run as they arrive.

    Ray pickles callbacks into the experiment state (`tuner.pkl`) and brings them back on
    `Tuner.restore`, so this holds only what names the runs and rebuilds its client lazily.
    """

    def __init__(self, uri: str, experiment: str, parent_id: str, phase: str,
                 base: Mapping[str, Any]) -> None:
        self.uri, self.experiment = uri, experiment
        self.parent_id, self.phase, self.base = parent_id, phase, dict(base)
        self._tracker: Tracker | None = None
        self.runs: dict[str, tuple[str, int]] = {}
        self.nodes: dict[str, list[str]] = {}
        self.stages: dict[str, dict[str, str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None, "runs": {}, "nodes": {}, "stages": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"nodes": {}, "stages": {}, **state})

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.uri, self.experiment)
        return self._tracker

    def _run(self, trial: Any) -> tuple[str, int]:
        if trial.trial_id not in self.runs:
            config = with_params(self.base, trial.config)
            self.runs[trial.trial_id] = self.tracker.open_child(
                self.parent_id, self.phase, trial.trial_id, config)
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        run_id, last = self._run(trial)
        self._note_node(trial.trial_id, run_id, result.get("node_id"))
        self._note_stages(trial.trial_id, run_id, result)
        for key, value in result.items():
            if key.startswith(ARTIFACT_PREFIX) and isinstance(value, str) and Path(value).is_dir():
                self.tracker.client.log_artifacts(run_id, value, key[len(ARTIFACT_PREFIX):])
        if int(result.get("epoch", 0)) > last:
            self.tracker.log_epoch(run_id, {**result, "method": self.base["method"]})
            self.runs[trial.trial_id] = (run_id, int(result["epoch"]))

    def _note_stages(self, trial_id: str, run_id: str, result: Mapping[str, Any]) -> None:
        """Tag ``stage/<name>`` = the cache key(s) of every shared stage the trial used."""
        tags = {k: v for k, v in result.items() if k.startswith(STAGE_PREFIX)
                and isinstance(v, str)}
        if tags and self.stages.get(trial_id) != tags:
            self.tracker.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.stages[trial_id] = tags

    def _note_node(self, trial_id: str, run_id: str, node: Any) -> None:
        """Tag the Ray node(s) a trial ran on (`ray_nodes`: more than one after a node loss)."""
        if not node:
            return
        nodes = self.nodes.setdefault(trial_id, [])
        if node not in nodes:
            if not nodes:  # after a driver restart, continue the run's existing list
                tag = self.tracker.client.get_run(run_id).data.tags.get("ray_nodes", "")
                nodes.extend(n for n in tag.split(",") if n and n != node)
            nodes.append(node)
            self.tracker.client.set_tag(run_id, "ray_nodes", ",".join(nodes))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id, _ = self._run(trial)
        if trial.last_result:
            self.tracker.log_epoch(run_id, {**trial.last_result, "method": self.base["method"]},
                                   final=True)
        self.tracker.close_child(run_id, "FINISHED")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id, _ = self._run(trial)
        self.tracker.client.set_tag(run_id, "retried", "true")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id, _ = self._run(trial)
        error = None
        if trial.error_file and Path(trial.error_file).is_file():
            error = Path(trial.error_file).read_text()
        self.tracker.close_child(run_id, "FAILED", error or "trial failed")
