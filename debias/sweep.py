"""From a validated Spec to Ray Tune: one search phase and one seeds phase per target.

Each phase is its own Tune experiment under `storage/<name>/<target>/<phase>`, so an
interrupted sweep resumes phase by phase with `Tuner.restore` (the Optuna study, the trials'
checkpoints and their retry counts all come back), and a finished phase restores instantly.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from debias.data import DatasetError, load_grouped
from debias.methods.base import PreflightError
from debias.spec import LABEL_FREE_METRICS, SearchDomain, Spec
from debias.tracking import MlflowTrialCallback, Tracker, redact_uri
from debias.trainable import train_trial

__all__ = ["Pipeline", "SweepError", "describe_plan", "phase_path", "pipelines", "preflight",
           "run_sweep"]

log = logging.getLogger("debias")
TUNE_METRIC = "selected/score"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says what to do."""


@dataclass(frozen=True)
class PhaseResult:
    best_params: dict[str, Any]
    best_score: float
    grid: tune.ResultGrid


@dataclass(frozen=True)
class Pipeline:
    """One (method, target) of a sweep: a search phase, then the seeds phase on its best
    config. Named after the target, or ``method/target`` in a study (its MLflow parent run
    and its folder under the sweep's storage)."""

    method: str
    target: str
    name: str


def pipelines(spec: Spec) -> list[Pipeline]:
    """Every pipeline of a sweep: per target, per method (targets outermost)."""
    return [Pipeline(m, t, f"{m}/{t}" if spec.is_study else t)
            for t in spec.targets for m in spec.methods]


def phase_path(spec: Spec, pipeline: Pipeline, phase: str) -> Path:
    return spec.storage / spec.name / pipeline.name / phase


def _domain(d: SearchDomain, grid: bool) -> Any:
    if d.kind == "choice":
        return tune.grid_search(list(d.values)) if grid else tune.choice(list(d.values))
    if d.kind == "float":
        return tune.loguniform(d.low, d.high) if d.log else tune.uniform(d.low, d.high)
    # Tune's integer domains exclude the upper bound; the sweep file's ranges include it.
    return tune.lograndint(d.low, d.high + 1) if d.log else tune.randint(d.low, d.high + 1)


def describe_plan(spec: Spec) -> str:
    s = spec.search
    lines = [
        f"sweep {spec.name!r}: {'study of ' if spec.is_study else ''}method "
        f"{', '.join(spec.methods)} on {spec.config['dataset']['name']} (from {spec.source})",
        f"  targets: {', '.join(f'{t} (bias {spec.bias_for(t)})' for t in spec.targets)}",
        f"  selection: {s['metric']} ({s['mode']}); " + (
            "no bias labels" if s["metric"] in LABEL_FREE_METRICS
            else "reads validation bias labels"),
    ]
    total = 0
    for method in spec.methods:
        n_search = num_search_trials(spec, method)
        total += len(spec.targets) * (n_search + len(spec.seeds))
        cls = spec.method_class(method)
        uses = ", ".join(sorted({cls.bias_labels(p).describe() for p in
                                 spec.param_variants(method)}))
        lines.append(f"  {method}: {s['algorithm']} search, {n_search} trial(s) per target; "
                     f"steps per trial: {cls.steps(spec.context(method))}; bias labels for "
                     f"training: {uses}")
        for d in spec.space_for(method):
            lines.append(f"    {d.path}: {d.describe()}")
    if spec.config["scheduler"]:
        lines.append(f"  early stopping: ASHA {spec.config['scheduler']['asha']}")
    lines += [
        f"  search trials train with seed {spec.search_seed} (search.trial_seed); reported "
        f"seeds: {spec.seeds} ({len(spec.seeds)} fresh re-runs of the best config per target)",
        f"  trials in all: {total}",
        f"  resources per trial: {spec.config['resources']}",
        f"  storage: {spec.storage}",
        f"  tracking: {redact_uri(spec.tracking_uri)}",
    ]
    return "\n".join(lines)


def num_search_trials(spec: Spec, method: str) -> int:
    space = spec.space_for(method)
    if not space:
        return 1
    if spec.search["algorithm"] == "grid":
        n = 1
        for d in space:
            n *= len(d.values)
        return n
    return spec.search["num_samples"]


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking URI must answer now; MLflow's own client would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an older server without /health): reachable
    except (OSError, ValueError) as exc:
        raise SweepError(f"tracking.uri: cannot reach the MLflow tracking server at "
                         f"{redact_uri(uri)} ({getattr(exc, 'reason', exc)}). Start it (see "
                         "README, 'MLflow') or use the default sqlite:///mlflow.db.") from None


def preflight(spec: Spec, dry_run: bool = False) -> None:
    """Everything knowable before Ray starts: the tracking server answers, the data is there
    and every split can be scored, then (SLIM with a person annotating) the answers exist."""
    check_tracking_server(spec.tracking_uri)
    for target in spec.targets:
        try:
            data = load_grouped(spec.config["dataset"], target, spec.bias_for(target))
        except DatasetError as exc:
            raise SweepError(str(exc)) from None
        for split in ("train", "val"):
            if len(data.view(split)) == 0:
                raise SweepError(f"dataset {data.name}: the {split} split has no samples "
                                 f"(target {target}, bias {data.bias})")
        empty = [(split, y, a) for split in ("val", "test")
                 for (y, a), n in _cells(data.group_counts(split)) if n == 0]
        if empty:
            log.warning("target %s: groups with no samples (skipped in worst-group accuracy): "
                        "%s", target, empty)
    for method in spec.methods:
        try:
            spec.method_class(method).preflight(spec, dry_run)
        except (PreflightError, DatasetError) as exc:
            raise SweepError(str(exc)) from None


def _cells(counts: Any) -> list[tuple[tuple[int, int], int]]:
    return [((y, a), int(counts[y, a])) for y in range(counts.shape[0])
            for a in range(counts.shape[1])]


def _check_state(spec: Spec, resume: bool) -> None:
    if resume:
        return
    where = ""
    if any(phase_path(spec, p, "search").exists() for p in pipelines(spec)):
        where = f"in {spec.storage / spec.name}"
    else:  # same name and store, other storage: the runs would mix in one experiment
        try:
            if Tracker(spec.tracking_uri, spec.name, create=False).parent_runs():
                where = f"in MLflow ({redact_uri(spec.tracking_uri)})"
        except LookupError:
            pass
    if where:
        raise SweepError(
            f"sweep {spec.name!r} already has results {where}. "
            "Pass --resume to continue it (a finished sweep just reprints its report), "
            "or give this run another name with --set name=NEW_NAME.")


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """`host:port` and `ray://host:port` must accept a TCP connection now: ray.init would
    otherwise keep retrying an address nobody listens on for minutes."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)", address.strip())
    if not match:
        return  # "auto", "local" and the like: Ray resolves and reports these itself
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise SweepError(f"cannot reach the Ray cluster at {address!r} ({exc.strerror or exc}). "
                         "Start one with `ray up cluster.yaml` (or `ray start --head`), or "
                         "drop --address to run on a local Ray.") from None


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`, or RAY_ADDRESS) or start a local Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # The classic reporter prints one compact status table instead of a box per result.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Save Tune's experiment state often: a killed driver then loses at most seconds of it.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SweepError(f"cannot reach the Ray cluster at {address!r}: {exc}. Start one "
                             "with `ray up cluster.yaml` or drop --address to run locally."
                             ) from None
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def check_resources(resources: dict[str, float]) -> None:
    """Fail now, not pending forever, when no node can ever hold one trial: neither a node
    that is up nor a node type the cluster's autoscaler may start."""
    need = {k: v for k, v in (("CPU", resources["cpu"]), ("GPU", resources["gpu"])) if v > 0}

    def fits(have: Any) -> bool:
        return all(have.get(k, 0) >= v for k, v in need.items())

    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(fits(r) for r in alive):
        return
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without this accessor: judge by live nodes
        config = None
    if config is not None and any(g.max_count != 0 and fits(g.resources)
                                  for g in config.node_group_configs):
        return
    largest = ", ".join(f"{{CPU: {r.get('CPU', 0):g}, GPU: {r.get('GPU', 0):g}}}"
                        for r in alive) or "none"
    raise SweepError(
        f"resources: every trial asks for {{cpu: {resources['cpu']:g}, gpu: "
        f"{resources['gpu']:g}}}, but no node of this Ray cluster can ever provide that "
        f"(nodes: {largest}; no autoscaling node type fits either). Lower resources.cpu / "
        "resources.gpu, or run on a cluster with such nodes (see cluster.yaml).")


def run_sweep(spec: Spec, *, address: str | None = None, resume: bool = False,
              num_cpus: int | None = None,
              on_target_done: Callable[[str], None] | None = None) -> Tracker:
    """Run (or resume) every pipeline's search and seeds phases; returns the tracker."""
    preflight(spec)
    _check_state(spec, resume)
    tracker = Tracker(spec.tracking_uri, spec.name)
    init_ray(address, num_cpus)
    check_resources(spec.config["resources"])
    for pipe in pipelines(spec):
        cls = spec.method_class(pipe.method)
        uses = sorted({cls.bias_labels(p).describe() for p in spec.param_variants(pipe.method)})
        metric = spec.search["metric"]
        parent = tracker.open_parent(pipe.name, {
            "sweep": spec.name, "method": pipe.method, "target_attribute": pipe.target,
            "dataset": spec.config["dataset"]["name"], "bias_attribute": spec.bias_for(
                pipe.target),
            "bias_labels": ",".join(uses), "selection_metric": metric,
            "selection_uses_bias_labels": str(metric not in LABEL_FREE_METRICS).lower(),
        })
        base = spec.trial_base(pipe.target, pipe.method)
        search = _run_phase(spec, pipe, "search", base, tracker, parent)
        seeds_space = {**search.best_params, "seed": tune.grid_search(spec.seeds)}
        _run_phase(spec, pipe, "seeds", base, tracker, parent, param_space=seeds_space)
        best_run = tracker.find_child(parent, "search", search.grid.get_best_result(
            TUNE_METRIC, spec.search["mode"], scope="last").metrics["trial_id"])
        tracker.close_parent(parent, {**search.best_params, "score": search.best_score},
                             best_run.info.run_id if best_run else "")
        if on_target_done:
            on_target_done(pipe.name)
    return tracker


def _reporter(spec: Spec, pipe: Pipeline, phase: str) -> tune.CLIReporter:
    columns = {"epoch": "epoch", "train/loss": "loss", "val/avg_acc": "val acc",
               "val/worst_group_acc": "val WGA", TUNE_METRIC: "selected"}
    params = ["seed"] if phase == "seeds" else [d.path for d in spec.space_for(pipe.method)]
    return tune.CLIReporter(metric_columns=columns, parameter_columns=params,
                            max_report_frequency=10, print_intermediate_tables=True)


def _search_setup(spec: Spec, pipe: Pipeline, base: dict[str, Any]
                  ) -> tuple[dict[str, Any], Any, int]:
    s = spec.search
    domains = spec.space_for(pipe.method)
    if not domains:
        return {"seed": base["seed"]}, BasicVariantGenerator(), 1
    grid = s["algorithm"] == "grid"
    space: dict[str, Any] = {d.path: _domain(d, grid) for d in domains}
    space["seed"] = base["seed"]
    if grid:
        return space, BasicVariantGenerator(random_state=s["seed"],
                                            max_concurrent=s.get("max_concurrent") or 0), 1
    if s["algorithm"] == "random":
        return space, BasicVariantGenerator(random_state=s["seed"],
                                            max_concurrent=s.get("max_concurrent") or 0), \
            s["num_samples"]
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=s["seed"])
    searcher: Any
    if any(d.when for d in domains):
        searcher = OptunaSearch(space=DefineByRun(domains), metric=TUNE_METRIC,
                                mode=s["mode"], sampler=sampler)
        space = {"seed": base["seed"]}
    else:
        searcher = OptunaSearch(sampler=sampler)
    if s.get("max_concurrent"):
        searcher = ConcurrencyLimiter(searcher, max_concurrent=s["max_concurrent"])
    return space, searcher, s["num_samples"]


class DefineByRun:
    """Optuna's define-by-run space for conditional keys: a key is suggested only when its
    `when` holds for the values already chosen. A class, not a closure, so Tune can pickle
    the searcher into its experiment state and restore it on --resume."""

    def __init__(self, domains: tuple[SearchDomain, ...]) -> None:
        self.domains = domains

    def __call__(self, trial: Any) -> None:
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


def _run_phase(spec: Spec, pipe: Pipeline, phase: str, base: dict[str, Any],
               tracker: Tracker, parent: str, param_space: dict[str, Any] | None = None
               ) -> PhaseResult:
    path = phase_path(spec, pipe, phase)
    target = pipe.name
    res = spec.config["resources"]
    trainable = tune.with_resources(tune.with_parameters(train_trial, base=base),
                                    {"cpu": res["cpu"], "gpu": res["gpu"]})
    callback = MlflowTrialCallback(tracker.uri, tracker.experiment, parent, phase, base)
    mode = spec.search["mode"]
    if tune.Tuner.can_restore(str(path)):
        log.warning("resuming %s/%s from %s", target, phase, path)
        # The saved state brings back the search algorithm, the trials and our callback.
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True,
                                   param_space=param_space)
    else:
        if param_space is None:
            param_space, searcher, num_samples = _search_setup(spec, pipe, base)
            scheduler = None
            if spec.config["scheduler"]:
                asha = spec.config["scheduler"]["asha"]
                scheduler = ASHAScheduler(time_attr="training_iteration",
                                          max_t=spec.config["train"]["epochs"],
                                          grace_period=asha["grace_period"],
                                          reduction_factor=asha["reduction_factor"])
        else:
            searcher, num_samples, scheduler = BasicVariantGenerator(), 1, None
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=TUNE_METRIC, mode=mode, search_alg=searcher, scheduler=scheduler,
                num_samples=num_samples, reuse_actors=True,
                trial_dirname_creator=lambda trial: f"{phase}_{trial.trial_id}"),
            run_config=tune.RunConfig(
                name=phase, storage_path=str(path.parent),
                failure_config=tune.FailureConfig(max_failures=spec.config["max_failures"]),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[callback],
                progress_reporter=_reporter(spec, pipe, phase),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    tracker.reconcile(parent, phase, base, grid)
    ok = [r for r in grid if r.error is None and r.metrics and TUNE_METRIC in r.metrics]
    if not ok:
        errors = "; ".join(str(r.error)[:300] for r in grid if r.error is not None)
        raise SweepError(f"{target}/{phase}: every trial failed ({errors})")
    best = grid.get_best_result(TUNE_METRIC, mode, scope="last")
    params = {k: v for k, v in best.config.items() if k != "seed"}
    return PhaseResult(best_params=params, best_score=float(best.metrics[TUNE_METRIC]),
                       grid=grid)
