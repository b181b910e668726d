"""What a running sweep writes to MLflow, and how it survives a tracking outage.

Only the driver talks to MLflow: trials report to Ray, and a Tune callback forwards their
results. Every write goes through one :class:`~debias.tracking_writer.TrackingWriter`: it is
queued and applied by a background thread, so the scheduling loop never waits on the
tracking server and never sees its errors; what cannot be written now goes to a journal under
the sweep's storage and is written, in order and once, when the server answers again (or by
``--resume`` / ``--sync`` after the sweep ended with the server down).

Runs are addressed by logical keys (a pipeline's parent; a trial by pipeline, phase and Tune
trial id), never by MLflow run ids, so a write may be journaled before its run exists, and a
resumed driver finds every run again instead of creating it twice. Metric rows carry the
result's own timestamp, so a result sent twice (a replayed journal, an epoch re-logged by
:meth:`SweepLog.reconcile`) is the same row and MLflow keeps it once.
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ray import tune

from debias import tracking_writer as tw
from debias.spec import config_hash, trial_config
from debias.stage_plan import STAGE_PHASE
from debias.tracking import (
    ARTIFACT_PREFIX,
    FAILURE_KEY,
    FINAL_PREFIXES,
    IGNORED_PREFIXES,
    NOTE_PREFIX,
    ROLE_TAG,
    STAGE_PREFIX,
    SWEEP_ID_TAG,
    best_as_params,
    flatten,
)

__all__ = ["MlflowTrialCallback", "SweepLog"]

log = logging.getLogger("debias")


def _metrics(result: Mapping[str, Any], final: bool) -> dict[str, float]:
    """The numbers of a result that go to MLflow: each epoch's ``group/name`` keys, or at
    the end (``final``) the test and selection metrics only; never Ray's bookkeeping."""
    return {k: v for k, v in result.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and "/" in k
            and not k.startswith(IGNORED_PREFIXES) and k.startswith(FINAL_PREFIXES) == final}


def _epoch(result: Mapping[str, Any]) -> int | None:
    """A result's epoch, or None where it has none (a failure's or a stage's report: in a
    result table its cell is NaN)."""
    try:
        value = float(result.get("epoch", 0) or 0)
    except (TypeError, ValueError):
        return None
    return int(value) if math.isfinite(value) else None


def _stamp_ms(result: Mapping[str, Any]) -> int | None:
    """A result's own time in ms (None where it has none)."""
    try:
        value = float(result.get("timestamp", 0) or 0)
    except (TypeError, ValueError):
        return None
    return int(value * 1000) if math.isfinite(value) and value > 0 else None


def trial_error(trial_dir: str | None, error: Any = None,
                last: Mapping[str, Any] | None = None) -> str:
    """A failed trial's cause: a failure the trial reported itself (a deterministic one,
    never retried), else Tune's error file (the trial's own traceback), else Tune's error."""
    if last and isinstance(last.get(FAILURE_KEY), str):
        return last[FAILURE_KEY]
    path = Path(trial_dir) / "error.txt" if trial_dir else None
    if path is not None and path.is_file():
        return path.read_text()
    return repr(error) if error is not None else "the trial ended without a selection score"


class SweepLog:
    """The sweep's MLflow writes, through one journaled background writer."""

    #: The live log of each sweep in this process, so the Tune callback (which Tune pickles
    #: and restores) finds it again by the sweep's name.
    live: ClassVar[dict[str, SweepLog]] = {}

    def __init__(self, uri: str, experiment: str, storage: Path,
                 bases: Mapping[str, Mapping[str, Any]], resumed: bool = False,
                 sweep_id: str | None = None) -> None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        self.journal = tw.default_journal_dir(storage, experiment)
        self.writer = tw.TrackingWriter(uri, experiment, self.journal,
                                        artifact_location=artifacts)
        self.experiment = experiment
        self.storage = storage
        self.models = storage / experiment / "models"
        self.bases = {k: dict(v) for k, v in bases.items()}
        self.uri = uri
        #: The last epoch logged per trial run: a trial restarted from an older checkpoint
        #: re-reports epochs MLflow already has, which are not logged twice.
        self.logged: dict[tuple[str, ...], int] = {}
        self.resumed = resumed
        #: The sweep's id: every run key holds it, so this sweep writes only to its own
        #: runs, never to another sweep's of the same name (None: a sweep from before ids).
        self.sweep_id = sweep_id
        if resumed:  # the previous driver's journal first, so what MLflow holds is current
            self.writer.flush(60)
        SweepLog.live[experiment] = self

    # ------------------------------------------------------------------ keys

    def _scoped(self, key: tuple[str, ...]) -> tuple[str, ...]:
        return (*key, self.sweep_id) if self.sweep_id else key

    def parent_key(self, pipeline: str) -> tuple[str, ...]:
        return self._scoped(tw.parent_key(pipeline))

    def trial_key(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return self._scoped(tw.trial_key(params["pipeline"], params["phase"], params["trial"]))

    def _sweep_tags(self) -> dict[str, str]:
        return {SWEEP_ID_TAG: self.sweep_id} if self.sweep_id else {}

    # ------------------------------------------------------------------ parents

    def open_parent(self, pipeline: str, tags: Mapping[str, str]) -> None:
        """A pipeline's parent run, reused (set RUNNING again) on resume."""
        self.writer.submit(tw.ensure_run(
            self.parent_key(pipeline), name=pipeline,
            tags={ROLE_TAG: "parent", **self._sweep_tags(), **tags}, reopen=True))

    def close_parent(self, pipeline: str, best_params: Mapping[str, Any],
                     best: tuple[str, str] | None, status: str = "FINISHED",
                     end_ms: int | None = None) -> None:
        """The search's best config as ``best.*`` params, the best trial named, closed at
        ``end_ms`` (its last trial's end: closing it again on a later --resume is then the
        same write, and never moves its end time)."""
        key = self.parent_key(pipeline)
        if best_params:
            self.writer.submit(tw.log_params(key, best_as_params(best_params)))
        if best is not None:
            self.writer.submit(tw.set_tags(key, {"best_trial": f"{best[0]}/{best[1]}"}))
        self.writer.submit(tw.set_terminated(key, status, end_time_ms=end_ms))

    def interrupt_parent(self, pipeline: str, note: str = "interrupted: continue with --resume"
                         ) -> None:
        """KILLED with a note, never FINISHED; ``--resume`` reopens and closes it."""
        key = self.parent_key(pipeline)
        self.writer.submit(tw.set_tags(key, {"note": note}))
        self.writer.submit(tw.set_terminated(key, "KILLED"))

    # ------------------------------------------------------------------ trials

    def open_trial(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The trial's run (created once, set RUNNING again on a retry or a resume)."""
        config = trial_config(self.bases, params)
        pipeline, phase, trial_id = params["pipeline"], params["phase"], params["trial"]
        key = self.trial_key(params)
        self.writer.submit(tw.ensure_run(
            key, name=f"{phase}-{trial_id}", parent=self.parent_key(pipeline), reopen=True,
            params=flatten(config), tags={
                ROLE_TAG: "trial", **self._sweep_tags(), "phase": phase, "ray_trial_id": trial_id,
                "seed": str(config["seed"]), "method": str(config["method"]),
                "config_hash": config_hash(config), "target_attribute": config["target"],
                "bias_attribute": config["bias"],
                **({"search/sampler": str(params["sampler"])} if "sampler" in params else {})}))
        return key

    def _last_logged(self, key: tuple[str, ...]) -> int:
        """The last epoch MLflow holds for a run of an earlier driver (0 if none, or if the
        server does not answer now: then an epoch may be logged twice, never lost)."""
        if key not in self.logged:
            self.logged[key] = 0
            if self.resumed:
                try:
                    from mlflow.tracking import MlflowClient

                    client = MlflowClient(tracking_uri=self.uri)
                    exp = client.get_experiment_by_name(self.experiment)
                    runs = client.search_runs(
                        [exp.experiment_id], max_results=1,
                        filter_string=f"tags.`{tw.KEY_ID_TAG}` = '{tw.key_id(key)}'")
                    if runs:
                        history = client.get_metric_history(runs[0].info.run_id, "train/loss")
                        self.logged[key] = max((m.step for m in history), default=0)
                except Exception as exc:  # never stop the sweep for a read
                    log.debug("could not read the last logged epoch of %s: %s", key, exc)
        return self.logged[key]

    def log_result(self, key: tuple[str, ...], result: Mapping[str, Any],
                   final: bool = False) -> None:
        step = _epoch(result)
        if step is None:  # no epoch (a failure's or a stage's report): nothing per epoch
            if not final:
                return
            step = 0
        if not final:
            if step <= self._last_logged(key):
                return
            self.logged[key] = step
        stamp = _stamp_ms(result)
        metrics = _metrics(result, final)
        if metrics:
            self.writer.submit(tw.log_metrics(key, metrics, step=step, timestamp_ms=stamp))

    def set_tags(self, key: tuple[str, ...], tags: Mapping[str, str]) -> None:
        if tags:
            self.writer.submit(tw.set_tags(key, tags))

    def log_artifacts(self, key: tuple[str, ...], folder: str, name: str) -> None:
        self.writer.submit(tw.log_artifact(key, folder, name))

    def log_model(self, key: tuple[str, ...], trial_id: str, checkpoint: Path | None) -> None:
        """The selected model of a finished trial, copied out of its last checkpoint (which
        Tune may delete later) to a folder the writer can read whenever it gets to it."""
        if checkpoint is None or not checkpoint.is_dir():
            return
        files = [checkpoint / n for n in ("state_dict.pt", "config.yaml")
                 if (checkpoint / n).is_file()]
        if not files:
            return
        folder = self.models / trial_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, folder / f.name)
        except OSError as exc:  # never raise into Tune's loop; a full disk stops the sweep
            log.warning("could not keep the selected model of trial %s (%s)", trial_id, exc)
            if exc.errno == errno.ENOSPC:
                from debias.tune_state import DiskWatch

                DiskWatch.note(self.storage, f"copying the model of trial {trial_id}: {exc}")
            return
        self.writer.submit(tw.log_artifact(key, folder, "model"))

    def close_trial(self, key: tuple[str, ...], status: str, error: str | None = None,
                    end_ms: int | None = None) -> None:
        if error:
            self.writer.submit(tw.set_tags(key, {"error": error[-5000:]}))
        self.writer.submit(tw.set_terminated(key, status, end_time_ms=end_ms))

    # ------------------------------------------------------------------ repair

    def reconcile(self, grid: Any, searcher: Any) -> None:
        """Make MLflow agree with Ray's record of the sweep after ``Tuner.fit``: runs the
        driver never logged are created, every epoch is logged (a repeat is the same row),
        and each trial ends as the searcher saw it end: FINISHED, FAILED, or KILLED when an
        interruption stopped it (``--resume`` reopens it)."""
        known: set[tuple[str, ...]] = set()
        for result in grid:
            cfg = result.config or {}
            if not {"pipeline", "phase", "trial"} <= set(cfg) or cfg["pipeline"] not in self.bases:
                continue
            key = self.open_trial(cfg)
            known.add(tuple(key))
            history = result.metrics_dataframe
            if history is not None and len(history):
                for row in history.to_dict("records"):
                    self.log_result(key, row)
            record = searcher.pipes[cfg["pipeline"]].trials.get(cfg["trial"])
            # Ended at its last result's time: closing it again (a later --resume) is then
            # the same write, not a new end time.
            end = _stamp_ms(result.metrics or {})
            if record is None or not record.done:
                self.set_tags(key, {"note": "interrupted: --resume continues it from its last "
                                            "checkpoint"})
                self.writer.submit(tw.set_terminated(key, "KILLED"))
            elif record.ok:
                if result.metrics:
                    self.log_result(key, result.metrics, final=True)
                self.close_trial(key, "FINISHED", end_ms=end)
            else:
                self.close_trial(key, "FAILED", trial_error(result.path, result.error,
                                                            result.metrics), end_ms=end)
        self._close_orphans(known)

    def close_running(self, note: str) -> None:
        """Every trial run still RUNNING ends KILLED with ``note`` (the sweep stopped without
        Ray's record of it, e.g. on a full disk); ``--resume`` reopens them."""
        self._close_orphans(set(), note)

    def _close_orphans(self, known: set[tuple[str, ...]],
                       note: str = "orphaned: no Ray trial resumed it") -> None:
        """Runs left RUNNING by a killed driver for trials Ray never recorded (suggested,
        then killed before Tune saved its state): KILLED and marked, never duplicated. Needs
        the server now; if it does not answer, the next --resume does it."""
        import json

        if not self.flush(30):
            return
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            running = client.search_runs(
                [exp.experiment_id], max_results=10_000,
                filter_string=f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'RUNNING'")
        except Exception as exc:  # never stop the sweep for a read
            log.debug("could not look for orphaned runs: %s", exc)
            return
        for run in running:
            key = tuple(json.loads(run.data.tags.get(tw.KEY_TAG, "null")) or ())
            if key and key not in known:
                self.set_tags(key, {"note": note})
                self.writer.submit(tw.set_terminated(key, "KILLED"))

    # ------------------------------------------------------------------ the end

    def flush(self, timeout_s: float | None = None) -> bool:
        return self.writer.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> int:
        """Write what can be written within ``timeout_s``; returns what is left journaled."""
        left = self.writer.close(timeout_s)
        SweepLog.live.pop(self.experiment, None)
        return left

    def summary(self) -> str:
        return self.writer.status().summary()


class MlflowTrialCallback(tune.Callback):
    """Forwards each trial's results to its run as they arrive, through the sweep's log.

    Tune pickles callbacks into the experiment state and restores them with
    ``Tuner.restore``: this holds only the sweep's name (the live :class:`SweepLog` is found
    by it) and the little it remembers per trial (the Ray nodes it ran on), which Tune saves
    with the experiment through :meth:`get_state`.
    """

    def __init__(self, experiment: str) -> None:
        self.experiment = experiment
        self.nodes: dict[str, list[str]] = {}
        self._opened: set[str] = set()
        self._stages: dict[str, dict[str, str]] = {}
        self._artifacts: set[tuple[str, str]] = set()

    @property
    def log(self) -> SweepLog:
        return SweepLog.live[self.experiment]

    def get_state(self) -> dict[str, Any]:
        return {"nodes": self.nodes}

    def set_state(self, state: dict[str, Any]) -> None:
        self.nodes = dict(state.get("nodes", {}))

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "nodes": self.nodes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["experiment"])  # type: ignore[misc]
        self.nodes = dict(state.get("nodes", {}))

    def _open(self, trial: Any) -> tuple[str, ...]:
        if trial.trial_id not in self._opened:
            self._opened.add(trial.trial_id)
            return self.log.open_trial(trial.config)
        return self.log.trial_key(trial.config)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.config.get("phase") == STAGE_PHASE:  # a stage task: no run of its own
            return
        self._opened.discard(trial.trial_id)  # a (re)start: set the run RUNNING again
        self._open(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        if trial.config.get("phase") == STAGE_PHASE:  # a stage task: no run of its own
            return
        key = self._open(trial)
        self._note_node(trial.trial_id, key, result.get("node_id"))
        notes = {k[len(NOTE_PREFIX):]: v for k, v in result.items()
                 if k.startswith(NOTE_PREFIX) and isinstance(v, str)}
        if notes:
            self.log.set_tags(key, notes)
        stages = {k: v for k, v in result.items() if k.startswith(STAGE_PREFIX)
                  and isinstance(v, str)}
        if stages and self._stages.get(trial.trial_id) != stages:
            self.log.set_tags(key, stages)
            self._stages[trial.trial_id] = stages
        for name, value in result.items():
            if name.startswith(ARTIFACT_PREFIX) and isinstance(value, str) and \
                    (trial.trial_id, name) not in self._artifacts and Path(value).is_dir():
                self.log.log_artifacts(key, value, name[len(ARTIFACT_PREFIX):])
                self._artifacts.add((trial.trial_id, name))
        self.log.log_result(key, result)

    def _note_node(self, trial_id: str, key: tuple[str, ...], node: Any) -> None:
        """Tag the Ray node(s) a trial ran on (`ray_nodes`: more than one after a node loss)."""
        if not node:
            return
        nodes = self.nodes.setdefault(trial_id, [])
        if node not in nodes:
            nodes.append(node)
            self.log.set_tags(key, {"ray_nodes": ",".join(nodes)})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.config.get("phase") == STAGE_PHASE:  # a stage task: no run of its own
            return
        key = self._open(trial)
        failure = (trial.last_result or {}).get(FAILURE_KEY)
        if isinstance(failure, str):  # it failed for good and said why: not a finished run
            self.log.close_trial(key, "FAILED", failure)
            return
        if trial.last_result:
            self.log.log_result(key, trial.last_result, final=True)
        checkpoint = getattr(trial, "checkpoint", None)
        self.log.log_model(key, trial.trial_id,
                           Path(checkpoint.path) if checkpoint is not None else None)
        self.log.close_trial(key, "FINISHED")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.config.get("phase") == STAGE_PHASE:  # a stage task: no run of its own
            return
        self.log.set_tags(self._open(trial), {"retried": "true"})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.config.get("phase") == STAGE_PHASE:  # a stage task: no run of its own
            return
        folder = str(Path(trial.error_file).parent) if trial.error_file else None
        self.log.close_trial(self._open(trial), "FAILED", trial_error(folder))

