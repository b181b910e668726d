"""The search of a whole sweep as one Ray Tune search algorithm: every pipeline at once.

A sweep has one pipeline per target (per method in a study): a search phase, then the seeds
phase on the search's best config. Running them as separate Tune experiments, one after
another, idles every slot but one at each phase boundary and during each phase's last wave.
Here one Tuner runs them all: :class:`SweepSearcher` hands out the next config of whichever
pipeline has one (search trials of every pipeline interleaved; a pipeline's seeds trials the
moment its search has finished), so a slot idles only when no pipeline has work left.

Each suggestion carries its pipeline, its phase and the Tune trial id as config keys
(``pipeline``, ``phase``, ``trial``): the trainable picks its base config by pipeline, the
MLflow callback its parent run, and a trial that never reported is still identified by its
config. The searcher's whole state (each pipeline's Optuna study, which trials finished
without error and their scores) is pickled into Tune's experiment state, so ``--resume``
continues the very same studies and releases the seeds phase only once the *complete* search
is known. Only trials that finished without error count toward the best config, in every
phase: a trial that hit a lucky epoch and then crashed is never re-run for the seeds.

:class:`PipelineScheduler` runs one ASHA per pipeline's search (trials of different targets
or methods are never compared) and never stops a seeds trial.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from debias.params import SearchDomain
from debias.spec import PIPELINE_KEYS, trial_config
from debias.stage_plan import STAGE_PHASE, StagePlanner
from debias.tracking import FAILURE_KEY
from debias.trial_config import Settings, TrialConfig

__all__ = ["PIPELINE_KEYS", "DefineByRun", "PipelinePlan", "PipelineScheduler", "SweepSearcher",
           "TrialRecord"]

log = logging.getLogger("debias")

class DefineByRun:
    """Optuna's define-by-run space for conditional keys: a key is suggested only when its
    `when` holds for the values already chosen."""

    def __init__(self, domains: tuple[SearchDomain, ...]) -> None:
        self.domains = domains

    def __call__(self, trial: Any) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for d in self.domains:
            if not d.active(chosen):
                continue
            if d.kind == "choice":
                chosen[d.path] = trial.suggest_categorical(d.path, list(d.values))
            elif d.kind == "float":
                chosen[d.path] = trial.suggest_float(d.path, d.low, d.high, log=d.log)
            else:
                chosen[d.path] = trial.suggest_int(d.path, int(d.low), int(d.high), log=d.log)
        return chosen


def startup_trials(num_samples: int, given: int | None = None) -> int:
    """How many of a TPE search's trials are drawn at random before the model takes over.

    Optuna's default (10) exceeds every small budget, so a 3- to 16-trial search would never
    get a model-based suggestion: a third of the budget (at least 2, at most Optuna's 10)
    explores at random, the rest is TPE. ``search.startup_trials`` sets it explicitly."""
    if given is not None:
        return min(given, num_samples)
    return min(num_samples, max(2, min(10, math.ceil(num_samples / 3))))


@dataclass(frozen=True)
class PipelinePlan:
    """What the searcher needs to know of one pipeline."""

    name: str
    domains: tuple[SearchDomain, ...]
    algorithm: str  # optuna | random | grid
    num_samples: int
    seeds: tuple[int, ...]
    max_concurrent: int | None = None
    #: TPE's random start-up trials (``algorithm: optuna`` only); None: :func:`startup_trials`.
    startup: int | None = None
    #: Per-trial step count by config, to tell a trial ASHA stopped from one that ran out.
    planned_steps: Callable[[Mapping[str, Any]], int] | None = None

    def n_startup(self) -> int:
        return startup_trials(self.num_samples, self.startup)

    def samplers(self) -> dict[str, int]:
        """How many search trials each sampler produces, for the plan: ``random``, ``grid``,
        ``tpe-startup`` (TPE's random start) and ``tpe`` (model-based)."""
        if not self.domains:
            return {"fixed": 1}
        if self.algorithm != "optuna":
            total = (math.prod(len(d.values) for d in self.domains)
                     if self.algorithm == "grid" else self.num_samples)
            return {self.algorithm: total}
        start = self.n_startup()
        return {"tpe-startup": start, "tpe": self.num_samples - start}


@dataclass
class TrialRecord:
    """One suggested trial: its phase and params, and how it ended (if it did)."""

    phase: str
    params: dict[str, Any]
    number: int | None = None  # the Optuna trial number, for the search phase
    done: bool = False
    ok: bool = False
    score: float = math.nan
    #: Which sampler drew the config (``search/sampler``): random, grid, tpe-startup, tpe,
    #: fixed (no search space) or seeds (the seeds phase re-runs the best).
    sampler: str = "seeds"
    #: Stopped early by the scheduler (ASHA): told to Optuna as pruned, not complete.
    pruned: bool = False
    #: Steps (epochs) it reported.
    steps: int = 0


@dataclass
class _Pipeline:
    plan: PipelinePlan
    trials: dict[str, TrialRecord] = field(default_factory=dict)
    queue: list[Draw] = field(default_factory=list)
    #: The next config, drawn but waiting for its shared stages (the planner computes them).
    parked: Draw | None = None
    sampled: int = 0
    study: Any = None
    #: Optuna trials asked and not yet told, by number (a pruned one reports its last score).
    asked: dict[int, Any] = field(default_factory=dict)
    best: str | None = None  # trial id of the best finished search trial
    seeds_released: bool = False
    #: Its trials read shared stages (known once one was asked for): its seeds then wait for
    #: stage tasks of their own, so its search is the longer road to the sweep's end.
    has_stages: bool = False

    def live(self) -> int:
        return sum(not r.done for r in self.trials.values())

    def search_done(self) -> bool:
        search = [r for r in self.trials.values() if r.phase == "search"]
        return self.sampled >= self.total_search() and len(search) == self.total_search() \
            and all(r.done for r in search)

    def total_search(self) -> int:
        return sum(self.plan.samplers().values())

    def finished(self) -> bool:
        return self.seeds_released and not self.queue and self.parked is None and all(
            r.done for r in self.trials.values())



#: A drawn config waiting to be handed out: (phase, params, Optuna trial number, sampler).
Draw = tuple[str, dict[str, Any], "int | None", str]


class SweepSearcher(Searcher):
    """Every pipeline's search, then its seeds, through one Tune search algorithm."""

    #: The live searcher of each sweep in this process (set on creation and on restore), so
    #: the driver can read the outcome after ``Tuner.fit`` (Tune keeps its own reference).
    live: ClassVar[dict[str, SweepSearcher]] = {}

    def __init__(self, sweep: str, plans: list[PipelinePlan], metric: str, mode: str,
                 seed: int, bases: Mapping[str, Mapping[str, Any]] | None = None,
                 planner: StagePlanner | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.sweep = sweep
        self.seed = seed
        self.bases = {k: dict(v) for k, v in (bases or {}).items()}
        self.planner = planner
        self.stage_tasks: dict[str, str] = {}  # Tune trial id -> stage key
        self.pipes = {p.name: _Pipeline(p) for p in plans}
        self.owner: dict[str, str] = {}  # trial id -> pipeline
        self.on_search_done: Callable[[str], None] | None = None
        SweepSearcher.live[sweep] = self

    # ------------------------------------------------------------------ Tune's interface

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return True  # the space comes from the plans, not from Tune's param_space

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.planner is not None and (task := self.planner.next_task()) is not None:
            # A stage some trial waits for runs first, in a slot of its own.
            self.stage_tasks[trial_id] = task.key
            return {"pipeline": STAGE_PHASE, "phase": STAGE_PHASE, "trial": trial_id,
                    "stage": dataclasses.asdict(task)}
        waiting = self.planner is not None and self.planner.busy
        for pipe in self._by_priority():
            if pipe.plan.max_concurrent and pipe.live() >= pipe.plan.max_concurrent:
                waiting = True
                continue
            if pipe.parked is None:
                pipe.parked = self._next(pipe)
            if pipe.parked is None:
                waiting = waiting or not pipe.finished()
                continue
            if not self._stages_ready(pipe.plan.name, pipe.parked[1]):
                waiting = True  # its stages are being computed; other pipelines go on
                continue
            phase, params, number, sampler = pipe.parked
            pipe.parked = None
            pipe.trials[trial_id] = TrialRecord(phase, params, number, sampler=sampler)
            self.owner[trial_id] = pipe.plan.name
            return {**params, "pipeline": pipe.plan.name, "phase": phase, "trial": trial_id,
                    "sampler": sampler}
        return None if waiting else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self.stage_tasks:
            failure = (result or {}).get(FAILURE_KEY)
            assert self.planner is not None
            self.planner.finished(self.stage_tasks.pop(trial_id),
                                  "the stage task crashed" if error else failure)
            return
        name = self.owner.get(trial_id)
        if name is None:
            return
        pipe = self.pipes[name]
        record = pipe.trials[trial_id]
        if record.done:
            return
        record.done = True
        score = float((result or {}).get(self.metric, math.nan))
        # A trial counts only if it ended without error *and* reported a selection score.
        record.ok = not error and result is not None and not math.isnan(score)
        record.score = score
        steps = pipe.plan.planned_steps
        if record.ok and steps is not None and record.phase == "search":
            # Ended without error before its last step: the scheduler (ASHA) stopped it.
            planned = steps(trial_config(self.bases, {**record.params, "pipeline": name})
                            if name in self.bases else record.params)
            record.steps = int((result or {}).get("training_iteration", planned))
            record.pruned = record.steps < planned
        if record.phase == "search":
            self._tell(pipe, record)
            if pipe.search_done() and not pipe.seeds_released:
                self._release_seeds(pipe)

    # ------------------------------------------------------------------ outcome

    def best(self, pipeline: str) -> tuple[str, TrialRecord] | None:
        """(trial id, record) of the best search trial that finished without error."""
        pipe = self.pipes[pipeline]
        return (pipe.best, pipe.trials[pipe.best]) if pipe.best else None

    def complete(self, pipeline: str) -> bool:
        return self.pipes[pipeline].finished()

    def search_complete(self, pipeline: str) -> bool:
        return self.pipes[pipeline].search_done()

    def phase_records(self, pipeline: str, phase: str) -> dict[str, TrialRecord]:
        return {t: r for t, r in self.pipes[pipeline].trials.items() if r.phase == phase}

    def tied(self, pipeline: str) -> bool:
        """Every finished search trial scored the same: the search could not tell apart."""
        scores = [r.score for r in self.phase_records(pipeline, "search").values() if r.ok]
        return len(scores) > 1 and len(set(scores)) == 1

    def progress(self) -> dict[str, dict[str, int]]:
        """Per pipeline: trials done / running / still to come, for the live view."""
        out = {}
        for name, pipe in self.pipes.items():
            done = sum(r.done for r in pipe.trials.values())
            running = pipe.live()
            total = pipe.total_search() + len(pipe.plan.seeds)
            out[name] = {"done": done, "running": running,
                         "pending": max(0, total - done - running),
                         "phase": ("done" if pipe.finished() else
                                   "seeds" if pipe.seeds_released else "search")}
        return out

    # ------------------------------------------------------------------ internals

    def _by_priority(self) -> list[_Pipeline]:
        """Which pipeline's next trial goes first: the longest road to the sweep's end first
        (critical-path list scheduling), so no slot idles at the end while one pipeline still
        has a search, its seeds' stage tasks and its seeds ahead of it.

        Search trials before seeds trials (a search trial holds up its pipeline's whole seeds
        phase; a seeds trial holds up nothing); among searches, pipelines whose seeds need
        stage tasks of their own first; then the pipeline with the fewest trials handed out
        (the searches advance together)."""
        def rank(p: _Pipeline) -> tuple[int, bool, int]:
            searching = not p.seeds_released and (p.sampled < p.total_search()
                                                  or p.parked is not None)
            return (0 if searching else 1, not p.has_stages, len(p.trials))

        return sorted(self.pipes.values(), key=rank)

    def _next(self, pipe: _Pipeline) -> Draw | None:
        if pipe.queue:
            return pipe.queue.pop(0)
        if pipe.seeds_released or pipe.sampled >= pipe.total_search():
            return None
        pipe.sampled += 1
        plan = pipe.plan
        if not plan.domains:
            return "search", {}, None, "fixed"
        study = self._study(pipe)
        sampler = plan.algorithm
        if plan.algorithm == "optuna":
            # What TPE will do for this ask: it samples at random while fewer than its
            # start-up count of trials are complete or pruned (running ones do not count).
            import optuna

            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            told = len(study.get_trials(deepcopy=False, states=states))
            sampler = "tpe-startup" if told < plan.n_startup() else "tpe"
        trial = study.ask()
        pipe.asked[trial.number] = trial
        return "search", DefineByRun(plan.domains)(trial), trial.number, sampler

    def _study(self, pipe: _Pipeline) -> Any:
        """The pipeline's Optuna study: every algorithm is a sampler behind one ask/tell."""
        if pipe.study is None:
            import optuna

            from debias.samplers import make_sampler

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            pipe.study = optuna.create_study(
                direction="maximize" if self.mode == "max" else "minimize",
                sampler=make_sampler(pipe.plan.algorithm, pipe.plan.domains,
                                     pipe.plan.n_startup(), self.seed))
        return pipe.study

    def _tell(self, pipe: _Pipeline, record: TrialRecord) -> None:
        if record.number is not None:
            import optuna

            study = self._study(pipe)
            if record.ok and math.isfinite(record.score) and record.pruned:
                # TPE ranks a pruned trial by its last intermediate value and step.
                asked = pipe.asked.pop(record.number)
                asked.report(record.score, record.steps)
                study.tell(asked, state=optuna.trial.TrialState.PRUNED)
            elif record.ok and math.isfinite(record.score):
                study.tell(pipe.asked.pop(record.number), record.score)
            else:
                study.tell(pipe.asked.pop(record.number),
                           state=optuna.trial.TrialState.FAIL)
        if record.ok and (pipe.best is None or self._better(record.score,
                                                            pipe.trials[pipe.best].score)):
            pipe.best = next(t for t, r in pipe.trials.items() if r is record)

    def _stages_ready(self, pipeline: str, params: Mapping[str, Any]) -> bool:
        """Whether the shared stages a trial of these params reads exist (the planner starts
        the tasks that compute the missing ones)."""
        if self.planner is None or pipeline not in self.bases:
            return True
        from debias.methods import resolve_method

        config = TrialConfig.of(trial_config(self.bases, {**params, "pipeline": pipeline}))
        requests = resolve_method(config.method).shared_stages(config, config.load_data())
        if requests:
            self.pipes[pipeline].has_stages = True
        return self.planner.ready(requests)

    def _better(self, score: float, than: float) -> bool:
        return score > than if self.mode == "max" else score < than

    def _release_seeds(self, pipe: _Pipeline) -> None:
        pipe.seeds_released = True
        if pipe.best is None:
            log.warning("%s: every search trial failed; its seeds phase cannot run",
                        pipe.plan.name)
            return
        best = pipe.trials[pipe.best].params
        pipe.queue = [("seeds", {**best, "seed": s}, None, "seeds") for s in pipe.plan.seeds]
        for _, params, _, _ in pipe.queue:  # start every seed's stages now, side by side
            self._stages_ready(pipe.plan.name, params)
        if self.tied(pipe.plan.name):
            log.warning("%s: every search trial scored %s on the selection metric: the search "
                        "could not tell the configs apart (the first one is re-run for the "
                        "seeds); train longer or search other knobs", pipe.plan.name,
                        pipe.trials[pipe.best].score)
        if self.on_search_done:
            self.on_search_done(pipe.plan.name)

    # ------------------------------------------------------------------ Tune's persistence

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "on_search_done": None, "stage_tasks": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        SweepSearcher.live[self.sweep] = self

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__getstate__(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        callback = self.on_search_done
        self.__setstate__(state)
        self.on_search_done = callback


def trial_steps(config: Settings) -> int:
    """The steps a trial of this resolved config reports when nothing stops it: its epochs,
    or a last-layer trial's grid points."""
    from debias.methods import resolve_method

    config = TrialConfig.of(config)
    method = resolve_method(config.method)
    params = method.params_of(config)
    if method.trial_kind(params) == "epochs":
        return config.train.epochs
    from debias.last_layer import grid_size

    return grid_size(params)  # type: ignore[arg-type]


class PipelineScheduler(FIFOScheduler):
    """One ASHA per pipeline's search (trials of other targets or methods are never
    compared); seeds trials always run to the end.

    Ray restores a scheduler as it was when the experiment started (its state is not saved),
    so ASHA's rungs would start empty on ``--resume`` and resumed trials would be compared
    with nobody. With ``state_path`` the rungs are written there (atomically) after every
    decision and read back on the first call after a restore."""

    def __init__(self, metric: str, mode: str, asha: Mapping[str, Any] | None,
                 max_t: Mapping[str, int], state_path: str | None = None) -> None:
        super().__init__()
        self._asha_settings = dict(asha) if asha else None
        self._max_t = dict(max_t)
        self._metric, self._mode = metric, mode
        self._per_pipeline: dict[str, ASHAScheduler] = {}
        self._state_path = state_path
        self._loaded = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # metric and mode are the sweep's, given at construction

    def _load(self) -> None:
        """The rungs a previous driver of this sweep saved, once per process."""
        self._loaded = True
        if self._state_path is None:
            return
        try:
            with open(self._state_path, "rb") as fh:
                saved = pickle.load(fh)
        except FileNotFoundError:
            return
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            log.warning("ASHA's saved rungs at %s do not load (%s); they restart empty: "
                        "trials resumed now are compared only with trials that report from "
                        "here on", self._state_path, exc)
            return
        self._per_pipeline.update(saved)

    def _save(self) -> None:
        if self._state_path is not None and self._per_pipeline:
            from debias.files import atomic_write_bytes

            atomic_write_bytes(self._state_path, pickle.dumps(self._per_pipeline))

    def _asha(self, trial: Any) -> ASHAScheduler | None:
        if self._asha_settings is None or trial.config.get("phase") != "search":
            return None
        if not self._loaded:
            self._load()
        name = trial.config["pipeline"]
        if name not in self._per_pipeline:
            self._per_pipeline[name] = ASHAScheduler(
                time_attr="training_iteration", metric=self._metric, mode=self._mode,
                max_t=self._max_t[name], grace_period=self._asha_settings["grace_period"],
                reduction_factor=self._asha_settings["reduction_factor"])
        return self._per_pipeline[name]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        asha = self._asha(trial)
        if asha is not None and trial.trial_id not in asha._trial_info:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        asha = self._asha(trial)
        if asha is None:
            return TrialScheduler.CONTINUE
        decision = asha.on_trial_result(tune_controller, trial, result)
        self._save()
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if (asha := self._asha(trial)) is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_complete(tune_controller, trial, result)
            self._save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        if (asha := self._asha(trial)) is not None and trial.trial_id in asha._trial_info:
            asha.on_trial_remove(tune_controller, trial)
            self._save()

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per pipeline ({len(self._per_pipeline)})" if self._asha_settings else \
            "FIFO"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))
