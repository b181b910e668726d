"""The one Ray Tune trainable: a plain function of a config that trains and reports.

Where it runs (which node, how many CPUs, which GPU fraction) is decided outside, by the
sweep planner; this function only limits torch's threads to the CPUs Ray gave it, so trials
packed on one machine don't oversubscribe its cores, and resumes from its last checkpoint
when Ray retries it after a crash. Which method it runs comes from the registry; what kind of
trial (SGD epochs or a last-layer grid) from the method: no method is named here.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import ray
from ray import tune

from debias.cache import CorruptFile
from debias.cluster import limit_threads
from debias.data import BiasLabelsHidden, DatasetError
from debias.engine import Trainer
from debias.files import atomic_torch_save
from debias.last_layer import LastLayerTrial
from debias.methods import Method, resolve_method
from debias.spec import trial_config
from debias.stage_plan import STAGE_PHASE, StageRequest, run_stage_task
from debias.tracking import FAILURE_KEY, NOTE_PREFIX
from debias.trial_config import Settings, TrialConfig

__all__ = ["MODEL_CONFIG", "MODEL_FILE", "STATE_FILE", "TRIAL_KINDS", "Trial", "build_trial",
           "limit_threads", "train_trial"]

STATE_FILE = "state.pt"
#: In every checkpoint beside the state: the model the validation metric selected so far
#: (weights only) and all it takes to rebuild it. The driver logs both to the trial's MLflow
#: run as ``model/state_dict.pt`` and ``model/config.yaml`` when the trial ends.
MODEL_FILE = "state_dict.pt"
MODEL_CONFIG = "config.yaml"


class Trial(Protocol):
    """What the trainable needs of a trial: steps to run, a checkpoint to resume from, and
    the model its selection picked."""

    epoch: int

    def epochs(self) -> Iterator[dict[str, Any]]: ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...

    def selected_model(self) -> dict[str, Any] | None: ...


#: The kinds of trial a method may ask for (:meth:`Method.trial_kind`).
TRIAL_KINDS: dict[str, Callable[..., Trial]] = {"epochs": Trainer, "last_layer": LastLayerTrial}


def build_trial(config: Settings, device: str | None = None) -> Trial:
    """The trial a config asks for: its method, in the kind of trial the method runs."""
    config = TrialConfig.of(config)
    method: type[Method] = resolve_method(config.method)
    kind = method.trial_kind(method.params_of(config))
    return TRIAL_KINDS[kind](config, method, device=device)


#: Failures that no retry can cure: bad or missing data, a method reading labels it
#: declared it does not use, a checkpoint or stage file that does not load; each method adds
#: its own (:attr:`Method.deterministic_errors`, SLIM's bad annotation file).
DETERMINISTIC: tuple[type[BaseException], ...] = (
    DatasetError, BiasLabelsHidden, CorruptFile, pickle.UnpicklingError)


def deterministic(config: Settings) -> tuple[type[BaseException], ...]:
    """The failures no retry cures for a trial or stage task of ``config``'s method."""
    try:
        return DETERMINISTIC + resolve_method(TrialConfig.of(config).method).deterministic_errors
    except Exception:  # an unloadable method fails on its own, with its own message
        return DETERMINISTIC


def _assigned_cpus() -> float:
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
    except Exception:  # outside a Ray worker (tests call train_trial directly)
        return float(os.cpu_count() or 1)


def _node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker
        return ""


def save_selected(trial: Trial, config: TrialConfig, folder: Path) -> None:
    """The selected model and its config (as Tune carried it), beside a checkpoint's state."""
    import yaml

    state = trial.selected_model()
    if state is not None:
        atomic_torch_save(folder / MODEL_FILE, state)
        (folder / MODEL_CONFIG).write_text(yaml.safe_dump(dict(config.raw), sort_keys=True))


def _start_together(config: TrialConfig, pipeline: str, trial: str, count: int,
                    timeout_s: float = 300.0) -> None:
    """debug.start_together: sign in under the cache folder (shared by every node), then
    wait until `count` trials of this pipeline have signed in. A retried trial has already
    signed in, so it does not wait again."""
    import time

    folder = Path(config.cache_dir) / "debug-start-together" / pipeline.replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / trial).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(folder.iterdir())) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def _checkpoints(checkpoint: Any) -> list[Path]:
    """The folders to resume from, newest first: Tune's latest checkpoint, then the older
    ones beside it (Tune keeps two) where storage is a local or shared file system."""
    with checkpoint.as_directory() as folder:
        latest = Path(folder)
    out = [latest]
    if type(getattr(checkpoint, "filesystem", None)).__name__ == "LocalFileSystem":
        out += sorted((p for p in latest.parent.glob("checkpoint_*")
                       if p.is_dir() and p.name < latest.name), reverse=True)
    return out


def _resume(config: Settings, checkpoint: Any) -> tuple[Trial, str | None]:
    """The trial, resumed from the newest checkpoint that loads (a checkpoint cut short by a
    kill or a full disk is skipped), or from scratch if none does; with a note naming what
    was skipped (None when the latest loaded, or there was none)."""
    config = TrialConfig.of(config)
    trainer = build_trial(config)
    if checkpoint is None:
        return trainer, None
    skipped: list[str] = []
    for folder in _checkpoints(checkpoint):
        try:
            trainer.load(folder / STATE_FILE)
        except Exception as exc:  # CorruptFile, or a state that does not fit
            skipped.append(f"{folder.name} does not load ({type(exc).__name__})")
            trainer = build_trial(config)  # nothing half-loaded carries over
            continue
        if not skipped:
            return trainer, None
        note = f"resumed from {folder.name}: {'; '.join(skipped)}"
        logging.getLogger("debias").warning("trial %s: %s", config.raw.get("trial", ""), note)
        return trainer, note
    note = f"restarted from scratch: {'; '.join(skipped)}"
    logging.getLogger("debias").warning("trial %s: %s", config.raw.get("trial", ""), note)
    return trainer, note


def train_trial(params: dict[str, Any], bases: dict[str, dict[str, Any]]) -> None:
    """Ray calls this with the searched values (`params`: dotted keys, `seed`, and the
    pipeline, phase and trial id the sweep's searcher adds); `bases` holds each pipeline's
    resolved trial config, bound once with `tune.with_parameters`."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint is noise
    limit_threads(_assigned_cpus())
    if params.get("phase") == STAGE_PHASE:  # a shared stage, planned before its trials
        stage = params["stage"]
        request = StageRequest(**{**stage, "after": tuple(stage["after"]),
                                  "work": tuple(tuple(w) for w in stage.get("work", ()))})
        try:
            run_stage_task(request)
        except deterministic(request.config) as exc:
            tune.report({FAILURE_KEY: f"{type(exc).__name__}: {exc}", "selected/score": math.nan})
            return
        tune.report({"stage_key": request.key, "selected/score": math.nan})
        return
    config = TrialConfig.of(trial_config(bases, params))
    checkpoint = tune.get_checkpoint()
    debug = config.debug
    try:
        if debug.bad_data:
            raise DatasetError("debug.bad_data: an injected deterministic failure")
        trainer, restart_note = _resume(config, checkpoint)
    except deterministic(config) as exc:
        # The same input fails the same way on every retry: end the trial now, with its
        # cause, instead of Tune retrying it max_failures times into the same wall.
        tune.report({FAILURE_KEY: f"{type(exc).__name__}: {exc}", "selected/score": math.nan})
        return
    if debug.start_together and params.get("phase") == "search":
        _start_together(config, str(params["pipeline"]), str(params.get("trial")),
                        debug.start_together)
    fail_at = debug.fail_once_at_epoch
    always = debug.fail_seed is not None and debug.fail_seed == config.seed
    doomed = debug.fail_lr is not None and debug.fail_lr == config.train.lr
    node_id = _node_id()
    for metrics in trainer.epochs():
        metrics["node_id"] = node_id  # a string: tagged on the MLflow run, not a metric
        if restart_note:  # a string: set as the run's `checkpoint` tag
            metrics[f"{NOTE_PREFIX}checkpoint"], restart_note = restart_note, None
        with tempfile.TemporaryDirectory() as folder:
            trainer.save(Path(folder) / STATE_FILE)
            save_selected(trainer, config, Path(folder))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        if always and trainer.epoch >= (fail_at or 1):
            raise RuntimeError(f"debug.fail_seed: injected failure of seed {config.seed} "
                               f"after epoch {trainer.epoch}")
        if doomed and trainer.epoch >= (fail_at or config.train.epochs):
            raise RuntimeError(f"debug.fail_lr: injected failure of train.lr "
                               f"{config.train.lr} after epoch {trainer.epoch}")
        if trainer.epoch == fail_at and checkpoint is None:
            raise RuntimeError(f"debug.fail_once_at_epoch: injected failure after epoch "
                               f"{trainer.epoch} (the retry resumes from this checkpoint)")
