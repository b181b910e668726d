"""From a validated Spec to one Ray Tune experiment that runs every pipeline at once.

A pipeline is one (method, target): a search phase, then the seeds phase on the best config of
the *complete* search. All pipelines share one Tuner (:mod:`debias.search`), so no slot idles
at a phase boundary while another pipeline has work. The experiment lives under
``storage/<name>/tune``; ``--resume`` restores it with ``Tuner.restore`` (the Optuna studies,
the trials' checkpoints, which trials finished and how all come back).

Interrupted (Ctrl-C, SIGTERM), the sweep stops honestly: running trials are marked KILLED in
MLflow with a note, no pipeline's seeds start on a partial search, no parent is closed, and
the exit says how to continue. Only trials that finished without error compete for the best
config, in every phase.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from debias.cache_space import alive_nodes, check_decoded_space, decoded_cache_lines
from debias.claim import ClaimRefused, adopt, claim_experiment, sweep_id
from debias.cluster import (
    ClusterError,
    check_resources,
    init_ray,
    node_types,
    packing_warnings,
    trials_per_node,
)
from debias.environment import redact_uri
from debias.files import LockHeld, atomic_write_text
from debias.preflight import (
    PreflightFailed,
    check_resume_config,
    check_state,
    method_preflight,
    preflight,
    record_config,
    resume_command,
    sweep_dir,
)
from debias.search import PipelinePlan, PipelineScheduler, SweepSearcher, trial_steps
from debias.sections import LABEL_FREE_METRICS
from debias.spec import Spec, config_hash
from debias.stage_plan import StagePlanner
from debias.sweep_log import MlflowTrialCallback, SweepLog
from debias.tracking import FAILURE_KEY, StoreNotReady, Tracker, open_store
from debias.trainable import train_trial
from debias.tune_state import DiskWatch, StateKeeper, disk_full_message, recover

__all__ = ["TUNE_METRIC", "Pipeline", "SweepError", "SweepInterrupted", "SweepOutcome",
           "describe_plan",
           "num_search_trials", "pipelines", "run_sweep", "tune_path"]

log = logging.getLogger("debias")
TUNE_METRIC = "selected/score"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says what to do."""


class SweepInterrupted(SweepError):
    """Ctrl-C or SIGTERM stopped the sweep; ``--resume`` continues it."""


@dataclass(frozen=True)
class Pipeline:
    """One (method, target) of a sweep: a search phase, then the seeds phase on its best
    config. Named after the target, or ``method/target`` in a study (its MLflow parent run)."""

    method: str
    target: str
    name: str


def pipelines(spec: Spec) -> list[Pipeline]:
    """Every pipeline of a sweep: per target, per method (targets outermost)."""
    return [Pipeline(m, t, f"{m}/{t}" if spec.is_study else t)
            for t in spec.targets for m in spec.methods]


def tune_path(spec: Spec) -> Path:
    return sweep_dir(spec) / "tune"


def num_search_trials(spec: Spec, method: str) -> int:
    return sum(_plan(spec, method, method).samplers().values())


def describe_plan(spec: Spec) -> str:
    s = spec.search
    lines = [
        f"sweep {spec.name!r}: {'study of ' if spec.is_study else ''}method "
        f"{', '.join(spec.methods)} on {spec.dataset.name} (from {spec.source})",
        f"  targets: {', '.join(f'{t} (bias {spec.bias_for(t)})' for t in spec.targets)}",
        f"  selection: {s.metric} ({s.mode}); " + (
            "no bias labels" if s.metric in LABEL_FREE_METRICS
            else "reads validation bias labels"),
    ]
    total = 0
    dataset = spec.dataset.name
    for method in spec.methods:
        n_search = num_search_trials(spec, method)
        total += len(spec.targets) * (n_search + len(spec.seeds))
        cls = spec.method_class(method)
        uses = ", ".join(sorted({cls.bias_labels(p, dataset).describe() for p in
                                 spec.param_variants(method)}))
        samplers = ", ".join(f"{n} {name}" for name, n in
                             _plan(spec, method, method).samplers().items() if n)
        lines.append(f"  {method}: {s.algorithm} search, {n_search} trial(s) per target "
                     f"({samplers}); steps per trial: {cls.steps(spec.context(method))}; bias "
                     f"labels for training: {uses}")
        for d in spec.space_for(method):
            lines.append(f"    {d.path}: {d.describe()}")
    if spec.asha is not None:
        lines.append(f"  early stopping: ASHA {spec.asha.model_dump()} per pipeline")
    lines += [f"  note: {note}" for note in spec.notes]
    lines += [
        f"  search trials train with seed {spec.search_seed} (search.trial_seed); reported "
        f"seeds: {spec.seeds} ({len(spec.seeds)} fresh re-runs of the best config per target)",
        f"  pipelines: {len(pipelines(spec))} at once; trials in all: {total}",
        f"  resources per trial: {spec.resources.model_dump()}",
        *decoded_cache_lines(spec),
        f"  storage: {spec.storage}",
        f"  tracking: {redact_uri(spec.tracking_uri)}",
    ]
    return "\n".join(lines)


def _plan(spec: Spec, method: str, name: str) -> PipelinePlan:
    s = spec.search
    return PipelinePlan(name=name, domains=spec.space_for(method), algorithm=s.algorithm,
                        num_samples=s.num_samples, seeds=tuple(spec.seeds),
                        max_concurrent=s.max_concurrent,
                        startup=s.startup_trials,
                        planned_steps=trial_steps if spec.asha is not None else None)


def _plans(spec: Spec) -> list[PipelinePlan]:
    return [_plan(spec, p.method, p.name) for p in pipelines(spec)]


def _max_epochs(spec: Spec, method: str) -> int:
    """ASHA's budget of a pipeline: the most epochs any of its trials can train (trials with
    fewer simply end there; the rungs compare trials at equal epochs)."""
    for d in spec.space_for(method):
        if d.path == "train.epochs":
            return int(max(d.values) if d.kind == "choice" else d.high)
    return spec.train.epochs


#: Signals that stop a sweep the way Ctrl-C does: a `kill`, a scheduler's stop, a closed
#: terminal or SSH session.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals_as_sigint() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the sweep the way Ctrl-C does (Tune catches SIGINT: it saves
    its state and returns; before Tune runs, Python raises KeyboardInterrupt), so a `kill`
    or a closed terminal is an interruption, never a crash that leaves runs RUNNING."""
    def forward(signum: int, frame: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    except ValueError:  # not the main thread: nothing to install
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


def run_sweep(spec: Spec, *, address: str | None = None, resume: bool = False,
              num_cpus: int | None = None, retry_failed: bool = False,
              on_pipeline_done: Callable[[str], None] | None = None) -> SweepOutcome:
    """Run (or resume) every pipeline. Raises SweepInterrupted when stopped early (Ctrl-C,
    SIGTERM, SIGHUP), SweepError when a sweep cannot start or a pipeline has no finished
    search trial.

    Before Ray starts, the sweep opens its tracking store (a new one is created under a
    lock) and claims its experiment there (:mod:`debias.claim`): a second sweep of the same
    name on the same store is refused, naming this one, whatever its storage."""
    with _stop_signals_as_sigint():
        try:
            preflight(spec, resume=resume, methods=False)
            if resume:  # a changed configuration is refused before anything is touched
                check_resume_config(spec)
            open_store(spec.tracking_uri)
        except (PreflightFailed, StoreNotReady) as exc:
            raise SweepError(str(exc)) from None
        try:
            claim = claim_experiment(spec.tracking_uri, spec.name, spec.storage)
        except ClaimRefused as exc:
            raise SweepError(str(exc)) from None
        try:
            return _run_claimed(spec, claim, address=address, resume=resume,
                                num_cpus=num_cpus, retry_failed=retry_failed,
                                on_pipeline_done=on_pipeline_done)
        finally:
            claim.release()


def _sweep_id(spec: Spec) -> tuple[str, bool]:
    """(the sweep's id, whether it is new: to be written with the sweep's config). Made on
    its first run, kept by --resume; a sweep started before ids keeps its runs' keys as they
    were ("legacy-...": keys without an id)."""
    folder = sweep_dir(spec)
    found = sweep_id(folder, create=False)
    if found:
        return found, False
    legacy = "legacy-" if (folder / "sweep.json").is_file() else ""
    return f"{legacy}{os.urandom(8).hex()}", True


def _run_claimed(spec: Spec, claim: Any, *, address: str | None, resume: bool,
                 num_cpus: int | None, retry_failed: bool,
                 on_pipeline_done: Callable[[str], None] | None) -> SweepOutcome:
    try:
        check_state(spec, resume)
    except PreflightFailed as exc:
        raise SweepError(str(exc)) from None
    sid, new_id = _sweep_id(spec)
    try:
        adopt(claim, spec.tracking_uri, spec.name, sid, spec.storage,
              has_runs=lambda: bool(Tracker(spec.tracking_uri, spec.name,
                                            create=False).parent_runs()))
    except ClaimRefused as exc:
        raise SweepError(str(exc)) from None
    try:
        init_ray(address, num_cpus)
        check_resources(spec.resources.model_dump())
    except ClusterError as exc:
        raise SweepError(str(exc)) from None
    try:  # after Ray is up: what a method builds first (SLIM's request) runs on a worker
        method_preflight(spec)
        check_decoded_space(spec, alive_nodes())  # cache.decoded fits on every node's disk
    except PreflightFailed as exc:
        raise SweepError(str(exc)) from None
    for warning in packing_warnings(spec.resources.model_dump(), node_types()):
        log.warning(warning)
    record_config(spec)
    if new_id:
        atomic_write_text(sweep_dir(spec) / "sweep_id", sid + "\n")

    pipes = pipelines(spec)
    bases = {p.name: spec.trial_base(p.target, p.method) for p in pipes}
    try:
        sweep_log = SweepLog(spec.tracking_uri, spec.name, spec.storage, bases, resumed=resume,
                             sweep_id=None if sid.startswith("legacy-") else sid)
    except LockHeld as exc:
        raise SweepError(f"sweep {spec.name!r}: its MLflow journal is in use by another "
                         f"process ({exc.note or exc.path}); is this sweep still running "
                         "elsewhere?") from None
    interrupted: list[str] = []
    failed: list[str] = []
    disk_full = None
    DiskWatch.full.pop(str(spec.storage), None)
    try:
        for p in pipes:
            sweep_log.open_parent(p.name, _parent_tags(spec, p))
        try:
            grid = _fit(spec, pipes, bases, resume, retry_failed)
        except Exception as exc:
            # Tune itself fails on a full disk (reading back an error file cut short):
            # the sweep stops as interrupted, with the folder and space named.
            if str(spec.storage) not in DiskWatch.full and not _no_space(exc):
                raise
            disk_full = _disk_full(spec)
            for p in pipes:
                sweep_log.interrupt_parent(p.name, note="stopped: the disk of storage is "
                                                        "full; continue with --resume")
            sweep_log.close_running("stopped: the disk of storage is full")
            raise SweepError(disk_full) from None
        if str(spec.storage) in DiskWatch.full:
            disk_full = _disk_full(spec)
        searcher = SweepSearcher.live[spec.name]
        sweep_log.reconcile(grid, searcher)
        interrupted = [p.name for p in pipes if not searcher.complete(p.name)]
        for p in pipes:
            if p.name in interrupted:
                sweep_log.interrupt_parent(p.name, **({"note": "stopped: the disk of storage "
                                                       "is full; continue with --resume"}
                                                      if disk_full else {}))
                continue
            end = _last_result_ms(grid, p.name)
            best = searcher.best(p.name)
            if best is None:
                failed.append(p.name)
                sweep_log.close_parent(p.name, {}, None, status="FAILED", end_ms=end)
                continue
            trial_id, record = best
            params = {k: v for k, v in record.params.items() if k != "seed"}
            sweep_log.close_parent(p.name, {**params, "score": record.score},
                                   ("search", trial_id), end_ms=end)
            if on_pipeline_done:
                on_pipeline_done(p.name)
    finally:
        # How long the end of a sweep waits for a tracking server that is down.
        left = sweep_log.close(timeout_s=float(os.environ.get("DEBIAS_TRACKING_DRAIN_S", 60)))
    outcome = SweepOutcome(pending_writes=left, journal=sweep_log.journal,
                           dropped=sweep_log.writer.status().dropped)
    if interrupted and disk_full:
        raise SweepError(disk_full)
    if interrupted:
        raise SweepInterrupted(
            f"sweep {spec.name!r} was interrupted; finished trials are kept, running ones "
            "resume from their last checkpoint, and no seeds phase starts before its search "
            f"is complete. Continue with: {resume_command(spec)}")
    if failed:
        errors = _trial_errors(grid, failed)
        raise SweepError(f"{', '.join(failed)}: every search trial failed ({errors})")
    return outcome


def _no_space(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _disk_full(spec: Spec) -> str:
    """The message of a sweep stopped by a full disk: the folder, the space, the command."""
    left = 0
    searcher = SweepSearcher.live.get(spec.name)
    if searcher is not None:
        with contextlib.suppress(Exception):
            left = sum(v["pending"] + v["running"] for v in searcher.progress().values())
    return disk_full_message(spec.storage, tune_path(spec), left, resume_command(spec))


def _last_result_ms(grid: Any, pipeline: str) -> int | None:
    """When the pipeline's last trial reported (ms), from Ray's record: a parent closed
    again by a later --resume ends at the same time."""
    stamps = []
    for result in grid:
        if (result.config or {}).get("pipeline") == pipeline:
            with contextlib.suppress(TypeError, ValueError):
                value = float((result.metrics or {}).get("timestamp") or 0)
                if value == value and value > 0:
                    stamps.append(int(value * 1000))
    return max(stamps) if stamps else None


@dataclass(frozen=True)
class SweepOutcome:
    """How a finished sweep left its tracking: writes still journaled (the server did not
    answer in time) are uploaded by ``--sync`` or ``--resume``."""

    pending_writes: int
    journal: Path
    #: Writes MLflow refused for good (recorded in the journal folder's dropped.jsonl):
    #: ``--resume`` rebuilds the runs from Ray's record.
    dropped: int = 0


def _trial_errors(grid: Any, pipelines_: list[str], limit: int = 3) -> str:
    """The causes of failed trials, from Ray's record (the tracking server may be down)."""
    causes: list[str] = []
    for result in grid:
        if (result.config or {}).get("pipeline") not in pipelines_:
            continue
        reported = (result.metrics or {}).get(FAILURE_KEY)
        if isinstance(reported, str):
            causes.append(reported[:300])
        elif result.error is not None:
            text = str(result.error).strip().splitlines()
            causes.append(text[-1][:300] if text else type(result.error).__name__)
    return "; ".join(dict.fromkeys(causes[:limit])) or "no error was recorded"


def _parent_tags(spec: Spec, p: Pipeline) -> dict[str, str]:
    cls = spec.method_class(p.method)
    dataset = spec.dataset.name
    uses = sorted({cls.bias_labels(v, dataset).describe()
                   for v in spec.param_variants(p.method)})
    metric = spec.search.metric
    return {"sweep": spec.name, "method": p.method, "target_attribute": p.target,
            "dataset": spec.dataset.name, "bias_attribute": spec.bias_for(p.target),
            "dataset_config": config_hash(spec.dataset.model_dump()),
            "bias_labels": ",".join(uses), "selection_metric": metric,
            "selection_uses_bias_labels": str(metric not in LABEL_FREE_METRICS).lower(),
            "trial_selects_among": cls.steps(spec.context(p.method))}


def _fit(spec: Spec, pipes: list[Pipeline], bases: dict[str, dict[str, Any]], resume: bool,
         retry_failed: bool) -> tune.ResultGrid:
    path = tune_path(spec)
    res = spec.resources
    trainable = tune.with_resources(tune.with_parameters(train_trial, bases=bases),
                                    {"cpu": res.cpu, "gpu": res.gpu})
    if resume and path.is_dir():
        try:  # a full disk may have cut Tune's state files short: the last good copy
            for line in recover(path):
                log.warning(line)
        except RuntimeError as exc:
            raise SweepError(str(exc)) from None
    if resume and tune.Tuner.can_restore(str(path)):
        log.warning("resuming sweep %r from %s", spec.name, path)
        # The saved state brings back the searcher, the scheduler, the trials and our callback.
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=retry_failed,
                                   restart_errored=False)
    else:
        plans = _plans(spec)
        # Shared stages are Ray tasks the searcher plans before the trials that read them.
        planner = StagePlanner(str(spec.storage / "cache"))
        searcher = SweepSearcher(spec.name, plans, metric=TUNE_METRIC, mode=spec.search.mode,
                                 seed=spec.search.seed, bases=bases, planner=planner)
        scheduler = PipelineScheduler(TUNE_METRIC, spec.search.mode,
                                      spec.asha.model_dump() if spec.asha else None,
                                      {p.name: _max_epochs(spec, p.method) for p in pipes},
                                      state_path=str(sweep_dir(spec) / "asha_rungs.pkl"))
        # The searcher says when it is done: stage tasks are trials too, and how many a sweep
        # needs is known only as configs are drawn.
        total = 10**9
        callback = MlflowTrialCallback(spec.name)
        tuner = tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                metric=TUNE_METRIC, mode=spec.search.mode, search_alg=searcher,
                scheduler=scheduler, num_samples=total, reuse_actors=True,
                max_concurrent_trials=spec.search.max_concurrent_total,
                trial_dirname_creator=lambda t: f"{t.config['phase']}_{t.trial_id}"),
            run_config=tune.RunConfig(
                name=path.name, storage_path=str(path.parent),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # The latest checkpoint is for resuming; each holds the selected model too.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[callback, DiskWatch(str(spec.storage))],
                progress_reporter=_reporter(spec),
                verbose=1,
            ),
        )
    with _pending_trials(_slots(spec)), StateKeeper(path):
        return tuner.fit()


def _slots(spec: Spec) -> int:
    """Trials the cluster can run at once now (and one node's worth more per autoscaling
    node type, so a waiting trial can ask for a node), capped by the sweep-wide cap."""
    res = spec.resources.model_dump()
    slots = sum(trials_per_node(res, r) for _, r, _scaling in node_types())
    cap = spec.search.max_concurrent_total
    return max(1, min(slots, cap) if cap else slots)


@contextlib.contextmanager
def _pending_trials(slots: int) -> Iterator[None]:
    """Let Tune keep a trial pending per slot. For a searcher of its own (ours), Tune keeps
    ONE trial pending at a time: when a trial ends, a reused warm worker takes the pending
    trial while the worker starting for the other slot is dropped, so a 2-slot sweep of short
    trials ran them one after another. More pending than slots would draw Optuna configs
    before there are results to learn from, so it is exactly the slots. An explicit
    TUNE_MAX_PENDING_TRIALS_PG wins."""
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(slots)
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _reporter(spec: Spec) -> Any:
    """The compact live view, or with ``--verbose`` Tune's own status tables."""
    if os.environ.get("DEBIAS_VERBOSE"):
        return tune.CLIReporter(metric_columns={
            "epoch": "epoch", "train/loss": "loss", "val/avg_acc": "val acc",
            "val/worst_group_acc": "val WGA", TUNE_METRIC: "selected"},
            parameter_columns=["pipeline", "phase", "seed"], max_report_frequency=10)
    from debias.progress import SweepProgress

    return SweepProgress(spec.name, TUNE_METRIC, spec.search.mode,
                         label=spec.search.metric)
