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
from debias.slim.dfr import class_weight_options
from debias.spec import SearchDomain, Spec
from debias.tracking import MlflowTrialCallback, Tracker, redact_uri
from debias.trainable import train_trial

__all__ = ["SweepError", "describe_plan", "phase_path", "preflight", "run_sweep"]

log = logging.getLogger("debias")
TUNE_METRIC = "selected/score"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says what to do."""


@dataclass(frozen=True)
class PhaseResult:
    best_params: dict[str, Any]
    best_score: float
    grid: tune.ResultGrid


def phase_path(spec: Spec, target: str, phase: str) -> Path:
    return spec.storage / spec.name / target / phase


def _domain(d: SearchDomain, grid: bool) -> Any:
    if d.kind == "choice":
        return tune.grid_search(list(d.values)) if grid else tune.choice(list(d.values))
    if d.kind == "float":
        return tune.loguniform(d.low, d.high) if d.log else tune.uniform(d.low, d.high)
    # Tune's integer domains exclude the upper bound; the sweep file's ranges include it.
    return tune.lograndint(d.low, d.high + 1) if d.log else tune.randint(d.low, d.high + 1)


def describe_plan(spec: Spec) -> str:
    s = spec.search
    n_search = _num_search_trials(spec)
    lines = [
        f"sweep {spec.name!r}: method {spec.method} on {spec.config['dataset']['name']} "
        f"(from {spec.source})",
        f"  targets: {', '.join(f'{t} (bias {spec.bias_for(t)})' for t in spec.targets)}",
        f"  search: {s['algorithm']}, {n_search} trial(s) per target, selecting by "
        f"{s['metric']} ({s['mode']})",
    ]
    for d in spec.space:
        rng = (f"choice {list(d.values)}" if d.kind == "choice"
               else f"{d.kind} [{d.low}, {d.high}]{' log' if d.log else ''}")
        when = "; ".join(f"{k} in {list(v)}" for k, v in d.when)
        lines.append(f"    {d.path}: {rng}" + (f" (only when {when})" if when else ""))
    if spec.config["scheduler"]:
        lines.append(f"  early stopping: ASHA {spec.config['scheduler']['asha']}")
    lines += [
        f"  seeds: {spec.seeds} ({len(spec.seeds)} re-runs of the best config per target)",
        f"  trials in all: {len(spec.targets) * (n_search + len(spec.seeds))}",
        f"  resources per trial: {spec.config['resources']}",
        f"  steps per trial: {_steps_per_trial(spec)}",
        f"  storage: {spec.storage}",
        f"  tracking: {redact_uri(spec.tracking_uri)}",
    ]
    return "\n".join(lines)


def _steps_per_trial(spec: Spec) -> str:
    """SGD epochs, or the last-layer grid's points where SLIM retrains the last layer."""
    epochs = f"{spec.config['train']['epochs']} epochs"
    slim = spec.config.get("slim") or {}
    searched = any(d.path == "slim.retrain" for d in spec.space)
    if spec.method != "slim" or (slim["retrain"] != "last_layer" and not searched):
        return epochs
    # Every dataset here has binary targets: 2 classes for the class-weight options.
    grid = len(slim["c_grid"]) * len(class_weight_options(slim["class_weight_ratios"], 2))
    points = f"{grid} grid points (C x class weights) for slim.retrain last_layer"
    return f"{epochs} for slim.retrain full, {points}" if searched else points


def _num_search_trials(spec: Spec) -> int:
    if not spec.space:
        return 1
    if spec.search["algorithm"] == "grid":
        n = 1
        for d in spec.space:
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


def _check_annotations(spec: Spec, dry_run: bool = False) -> None:
    """SLIM with human annotations: the file must hold rows for every retrain mode the sweep
    can take before trials start. Where it lacks some (or does not exist), build them here,
    once (reference model and GradCAM go to the stage cache the trials then reuse), and stop
    with what to do next. A dry run only says so: building rows trains the reference model."""
    slim = spec.config.get("slim") or {}
    if spec.method != "slim" or slim.get("annotator") != "csv":
        return
    from debias.annotate import ensure_request, missing_request_splits

    path = Path(slim["annotations"])
    if dry_run:
        missing = missing_request_splits(spec)
        if missing:
            print(f"note: slim.annotations {path} has no rows yet for split(s) "
                  f"{', '.join(missing)}; the first real run (or --annotate) writes them there "
                  "and stops before any trial.")
        return
    existed = path.is_file()
    _, added = ensure_request(spec)
    if not added:
        return
    what = (f"{added} rows for another retrain mode were added to {path}" if existed else
            f"{path} did not exist, so the annotation request was written there")
    raise SweepError(
        f"slim.annotations: {what} (GradCAM overlays in {path.stem}_overlays/ beside it). "
        f"Answer it in the browser with `python launch.py {spec.source} --annotate`, or fill "
        "its 'annotation' column by hand (1 = attention on the core object, 0 = not, -1 = "
        "unsure); then run the sweep again.")


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
    _check_annotations(spec, dry_run)


def _cells(counts: Any) -> list[tuple[tuple[int, int], int]]:
    return [((y, a), int(counts[y, a])) for y in range(counts.shape[0])
            for a in range(counts.shape[1])]


def _check_state(spec: Spec, resume: bool) -> None:
    if resume:
        return
    where = ""
    if any(phase_path(spec, t, "search").exists() for t in spec.targets):
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
    """Run (or resume) every target's search and seeds phases; returns the tracker."""
    preflight(spec)
    _check_state(spec, resume)
    tracker = Tracker(spec.tracking_uri, spec.name)
    init_ray(address, num_cpus)
    check_resources(spec.config["resources"])
    for target in spec.targets:
        parent = tracker.open_parent(target, {
            "sweep": spec.name, "method": spec.method,
            "dataset": spec.config["dataset"]["name"], "bias_attribute": spec.bias_for(target),
        })
        base = spec.trial_base(target)
        search = _run_phase(spec, target, "search", base, tracker, parent)
        seeds_space = {**search.best_params, "seed": tune.grid_search(spec.seeds)}
        _run_phase(spec, target, "seeds", base, tracker, parent, param_space=seeds_space)
        best_run = tracker.find_child(parent, "search", search.grid.get_best_result(
            TUNE_METRIC, spec.search["mode"], scope="last").metrics["trial_id"])
        tracker.close_parent(parent, {**search.best_params, "score": search.best_score},
                             best_run.info.run_id if best_run else "")
        if on_target_done:
            on_target_done(target)
    return tracker


def _reporter(spec: Spec, phase: str) -> tune.CLIReporter:
    columns = {"epoch": "epoch", "train/loss": "loss", "val/avg_acc": "val acc",
               "val/worst_group_acc": "val WGA", TUNE_METRIC: "selected"}
    params = ["seed"] if phase == "seeds" else [d.path for d in spec.space]
    return tune.CLIReporter(metric_columns=columns, parameter_columns=params,
                            max_report_frequency=10, print_intermediate_tables=True)


def _search_setup(spec: Spec, base: dict[str, Any]) -> tuple[dict[str, Any], Any, int]:
    s = spec.search
    if not spec.space:
        return {"seed": base["seed"]}, BasicVariantGenerator(), 1
    grid = s["algorithm"] == "grid"
    space: dict[str, Any] = {d.path: _domain(d, grid) for d in spec.space}
    space["seed"] = base["seed"]
    if grid:
        return space, BasicVariantGenerator(random_state=s["seed"],
                                            max_concurrent=s.get("max_concurrent", 0)), 1
    if s["algorithm"] == "random":
        return space, BasicVariantGenerator(random_state=s["seed"],
                                            max_concurrent=s.get("max_concurrent", 0)), \
            s["num_samples"]
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=s["seed"])
    searcher: Any
    if any(d.when for d in spec.space):
        searcher = OptunaSearch(space=DefineByRun(spec.space), metric=TUNE_METRIC,
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


def _run_phase(spec: Spec, target: str, phase: str, base: dict[str, Any], tracker: Tracker,
               parent: str, param_space: dict[str, Any] | None = None) -> PhaseResult:
    path = phase_path(spec, target, phase)
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
            param_space, searcher, num_samples = _search_setup(spec, base)
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
                progress_reporter=_reporter(spec, phase),
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
