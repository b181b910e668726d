"""Shared stages as tasks of their own, planned before the trials that need them.

A trial that computed its shared stages itself (the ERM reference model, frozen features,
GradCAM, JTT's identification model) would hold its slot, and every other trial needing the
same key would block on a file lock holding its own; on a cluster whose shared file system
does not honour locks each node would compute its own copy. So the sweep's searcher asks the
planner first: for each config it is about to hand out, the method names the stages the
trial will read (:meth:`debias.methods.base.Method.shared_stages`); each missing key becomes
one *stage task*, cluster-wide, once its own inputs exist; the config is handed out only
when every key it needs is in the stage cache. Other pipelines' trials use the slots
meanwhile.

A stage task runs in a Tune slot of its own (a trial of phase ``stage``, with the sweep's
per-trial resources, a GPU where trials get one), not as a bare Ray task: Tune keeps a warm
trial process cached between trials, and a bare task asking for the same resources would
wait behind it forever. It has no MLflow run; each appends a line to
``<cache>/stage_tasks.jsonl`` (stage, key, node, seconds): the record of which node computed
what, once. Cheap per-trial stages (k-means for one k, a curation for one curated size) stay
in the trial.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STAGE_PHASE", "StagePlanner", "StageRequest", "run_stage_task"]

log = logging.getLogger("debias")

TASK_LOG = "stage_tasks.jsonl"
#: The phase (and pipeline) name of a stage task's Tune trial.
STAGE_PHASE = "stage"


@dataclass(frozen=True)
class StageRequest:
    """One shared stage a trial needs: where its result will be, and how to compute it.

    ``run`` names a module-level function ``module:function`` called in the task as
    ``function(config, **kwargs)``; it computes the stage into the stage cache (through the
    same get-or-compute the trial calls, so the trial then finds it). ``after``: keys of
    stages that must exist first (the features need the reference model)."""

    stage: str
    key: str
    run: str
    config: dict[str, Any] = field(compare=False, hash=False)
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    after: tuple[str, ...] = ()
    #: What the stage computes, for ``--dry-run``'s estimate (:mod:`debias.estimate`): passes
    #: over splits, each ``(kind, split, passes)``, kind ``train`` (training steps),
    #: ``backward`` (a forward and backward pass that trains nothing: GradCAM) or ``eval``
    #: (forward only); empty: one ``eval`` pass over every split. Declared by whoever
    #: requests the stage, so the estimate knows no method.
    work: tuple[tuple[str, str, float], ...] = field(default=(), compare=False)

    @property
    def cache_dir(self) -> str:
        """The stage cache this request computes into (its trial's; the one key read here,
        so a stage task does not type the whole config to find its folder)."""
        return str(self.config["cache_dir"])


def _cache_file(cache_dir: str, stage: str, key: str) -> Path:
    from debias.cache import StageCache

    return StageCache(cache_dir).path(stage, key)


def run_stage_task(request: StageRequest) -> str:
    """What a stage task runs (in a Tune slot): compute one stage, record where.

    A key is computed once, also across a kill and ``--resume``: Tune restores a stage task
    that was running when the driver died, and the resumed planner may ask for the same key
    again. The second task finds the stage's file (nothing to do), or waits on the key's
    lock while the first computes it and then reuses it; only a task that computed the
    stage records a line in ``stage_tasks.jsonl``."""
    import ray

    from debias.cluster import limit_threads

    try:
        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (tests call it directly)
        cpus, node = float(os.cpu_count() or 1), ""
    if cpus:
        limit_threads(cpus)
    if _cache_file(request.cache_dir, request.stage, request.key).is_file():
        return request.key  # computed already (by the task this one repeats)
    from debias.cache import StageCache

    before = StageCache.events().get(f"cache/computed/{request.stage}", 0)
    module, _, name = request.run.partition(":")
    started = time.time()
    getattr(importlib.import_module(module), name)(request.config, **request.kwargs)
    if StageCache.events().get(f"cache/computed/{request.stage}", 0) == before:
        return request.key  # another task computed it while this one waited for its lock
    from debias.files import append_line

    append_line(Path(request.cache_dir) / TASK_LOG, json.dumps({
        "stage": request.stage, "key": request.key, "node": node,
        "seconds": round(time.time() - started, 3)}))
    return request.key


class StagePlanner:
    """Which stage tasks to run next, and whether a trial's stages are all in the cache."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir
        self._queue: dict[str, StageRequest] = {}  # key -> waiting to be handed out
        self._known: dict[str, StageRequest] = {}  # every stage asked for, by key
        self._running: set[str] = set()
        self._failed: dict[str, str] = {}  # key -> why (trials then compute it themselves)

    def __getstate__(self) -> dict[str, Any]:
        # Stage tasks in flight when the driver stopped run again if their file is absent.
        return {**self.__dict__, "_running": set(), "_queue": {}}

    def ready(self, requests: list[StageRequest]) -> bool:
        """Whether every stage in ``requests`` exists, its task over; queues the missing
        ones."""
        done = True
        for r in requests:
            self._known.setdefault(r.key, r)
            if self._done(r.key):
                continue
            done = False
            if r.key not in self._running:
                self._queue.setdefault(r.key, r)
        return done

    def next_task(self) -> StageRequest | None:
        """A queued stage whose inputs exist, to run now (None: nothing can start yet)."""
        for key, r in list(self._queue.items()):
            if self._exists(r):
                del self._queue[key]
                continue
            if all(self._done(k) for k in r.after):
                del self._queue[key]
                self._running.add(key)
                return r
        return None

    def finished(self, key: str, error: str | None = None) -> None:
        """A stage task ended; one that failed leaves the stage to its trials, which then
        compute it themselves (and report the same failure with its cause)."""
        self._running.discard(key)
        if error is not None:
            self._failed[key] = error
            log.warning("stage task for %s failed (%s); its trials compute it themselves",
                        key, error.strip().splitlines()[-1:] if error else "")

    @property
    def busy(self) -> bool:
        return bool(self._running or self._queue)

    def _done(self, key: str) -> bool:
        """The stage exists and no task of it is still running. A stage's file appears just
        before its task ends: handing out its trials then would have Tune ask for a new worker
        for them and, a moment later, give them the stage task's freed worker instead,
        removing that request while Ray is still placing it. Ray 2.60 can then leak the
        node's CPU and stop placing any later placement group (ray-project/ray#64693): a
        two-node sweep ran on one node for good. Waiting for the task's end lets Tune hand its
        worker straight to the next trial."""
        if key in self._failed:
            return True
        return key not in self._running and key in self._known and \
            self._exists(self._known[key])

    def _exists(self, r: StageRequest) -> bool:
        return _cache_file(self.cache_dir, r.stage, r.key).is_file()
