"""Sweep efficiency of the quickstart study on a local Ray, and where the rest goes.

The sweep runs every pipeline (target x method: a search phase, then the seeds phase on its
best config) in one Ray Tune experiment (debias/search.py), and each shared stage a method
needs (JTT's identification model and its error set) as a Tune trial of its own (phase
``stage``). So the measure is of the whole experiment, not per phase:

    efficiency = (sum of Tune trials' busy time / parallel slots) / sweep wall time,

the share of the slots' time that trials held. Stage tasks hold a slot like any trial and are
counted as busy time. Three wall times: the trials' span (first trial running -> last trial's
last result: what the trial order controls), the sweep with Ray up (what a sweep's fixed
start and end costs add), and the whole command. Busy is reported three ways, from the
broadest to the strictest:

- slots busy: a Tune trial's span on the driver's clock, from Tune setting it RUNNING to its
  last result (from Tune's experiment state; MLflow's run start/end are shown beside it, for
  trials only: stage tasks have no MLflow run, and a run's end is its last result's
  whole-second stamp);
- trainable time: Ray's ``time_total_s``, the trainable's own run time (building the trial,
  its epochs with evaluation, checkpoints, reports; a stage task's computation);
- training compute: per trial, epochs x samples per epoch x one sample's training time, each
  method measured in this process before the sweep (train_one_epoch minus its evaluation, with
  the torch threads a trial gets); per stage task, the seconds it recorded computing the
  stage (stage_tasks.jsonl). The only part that is "the work".

Two ways to run the sweep:

- default: ``run_sweep`` in this process after ``init_ray`` (timed alone), so efficiency is
  given excluding and including Ray start-up;
- ``--launch``: the quickstart as a user runs it, ``python launch.py SWEEP`` in a fresh temp
  dir (a subprocess, timed from start to exit: the wall clock a user waits); the trial spans
  come from the Tune folder and the MLflow store (sqlite) it wrote there, and start-up is
  what precedes Ray being up (imports, plan, data check, Ray's own start).

Also: per pipeline trial, the overhead = busy time minus its training compute, split into
Ray-side (span - time_total_s), trial set-up (first iteration minus a later one) and
per-epoch evaluation + checkpoint + report; and where the slots' idle time goes.

Ray runs under a RAY_TMPDIR of its own in the temp dir, so no other Ray on the machine (a test
suite's, a cluster's) is joined or disturbed.

    python benchmarks/bench_sweep_efficiency.py [--sweep sweeps/quickstart.yaml] [--launch]
        [--targets Odd] [--samples 3] [--seeds 0 1 2] [--epochs N] [--set KEY=VALUE ...]
        [--num-cpus 2] [--keep DIR] [--quick] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import contextlib
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from bench_common import command, machine, publish, stamp
from mlflow.tracking import MlflowClient

from debias.cluster import init_ray
from debias.preflight import CONFIG_FILE, sweep_dir
from debias.spec import Spec, load_spec
from debias.stage_plan import STAGE_PHASE, TASK_LOG
from debias.sweep import pipelines, run_sweep, tune_path
from debias.trainable import build_trial

REPO = Path(__file__).resolve().parents[1]
#: Keys a method reports in its first epoch when it trains on other than the whole split.
SAMPLE_KEYS = ("upsampled_size", "subset_size")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- calibration

def calibrate(spec: Spec, method: str, epochs: int) -> dict[str, float]:
    """One method's pieces, in this process with the CPUs a trial holds: set-up (a second
    build, so shared stages and the dataset are already there, as in a sweep's trial),
    training time per visited sample (without evaluation), samples per epoch, evaluation per
    epoch. NaN where the method's trial has no SGD epochs."""
    torch.set_num_threads(max(1, int(spec.resources.cpu)))
    config = spec.trial_base(spec.targets[0], method)
    build_trial(config, device="cpu")  # computes its shared stages, warms imports and data
    start = time.perf_counter()
    trial: Any = build_trial(config, device="cpu")
    setup = time.perf_counter() - start
    if not hasattr(trial, "train_one_epoch"):
        nan = float("nan")
        return {"setup": setup, "per_sample": nan, "samples": nan, "eval": nan}
    spent = {"eval": 0.0}
    visited: list[int] = []
    evaluate, order = trial.evaluate, trial.method.epoch_order

    def timed(split: str) -> dict[str, float]:
        t = time.perf_counter()
        try:
            return evaluate(split)
        finally:
            spent["eval"] += time.perf_counter() - t

    def counted(epoch: int, rng: Any) -> Any:
        positions = order(epoch, rng)
        visited.append(len(positions))
        return positions

    trial.evaluate = timed
    trial.method.epoch_order = counted
    per_sample, evals = [], []
    for _ in range(epochs):
        spent["eval"] = 0.0
        t = time.perf_counter()
        trial.train_one_epoch()
        per_sample.append((time.perf_counter() - t - spent["eval"]) / visited[-1])
        evals.append(spent["eval"])
    return {"setup": setup, "per_sample": statistics.median(per_sample),
            "samples": float(statistics.median(visited)), "eval": statistics.median(evals)}


# --------------------------------------------------------------------------- what the sweep left

@dataclass
class TuneTrial:
    """One Tune trial of the sweep: a pipeline's search or seeds trial, or a stage task."""

    trial_id: str
    pipeline: str
    phase: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    span: tuple[float, float] | None = None  # driver clock: RUNNING -> last result
    mlflow: tuple[float, float] | None = None  # its MLflow run's start and end
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.phase == STAGE_PHASE:
            return f"stage {self.config.get('stage', {}).get('stage', '?')}"
        return f"{self.pipeline} {self.phase}"


def tune_trials(folder: Path) -> dict[str, TuneTrial]:
    """Per Tune trial id: its config (params.json) and the result rows Tune wrote."""
    out: dict[str, TuneTrial] = {}
    for path in sorted(folder.glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        params = path.parent / "params.json"
        config = json.loads(params.read_text()) if params.is_file() else \
            (rows[-1].get("config", {}) if rows else {})
        if not rows or "phase" not in config:
            continue
        tid = str(rows[-1]["trial_id"])
        out[tid] = TuneTrial(tid, str(config.get("pipeline")), str(config["phase"]), config,
                             rows)
    return out


def experiment_state(folder: Path) -> tuple[float | None, dict[str, tuple[float, float]]]:
    """Tune's own record (its latest experiment state file): the experiment's start, and per
    trial the driver's time it was set RUNNING and of its last result. (None, {}) if absent
    or in a format this Ray does not write."""
    files = sorted(folder.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None, {}
    try:
        state = json.loads(files[-1].read_text())
        start = float(state["stats"]["start_time"])
        spans = {}
        for trial_json, meta_json in state["trial_data"]:
            trial, meta = json.loads(trial_json), json.loads(meta_json)
            if meta.get("start_time") and meta.get("last_result_time", 0) > 0:
                spans[str(trial["trial_id"])] = (float(meta["start_time"]),
                                                 float(meta["last_result_time"]))
        return start, spans
    except (KeyError, TypeError, ValueError, OSError) as exc:
        log(f"experiment state {files[-1]} not readable ({exc!r}); using MLflow's spans")
        return None, {}


def mlflow_walls(spec: Spec) -> dict[str, tuple[float, float]]:
    """Per Tune trial id: its MLflow run's start and end (epoch seconds)."""
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    if exp is None:
        return {}
    out = {}
    for run in client.search_runs([exp.experiment_id], max_results=10_000):
        trial = run.data.tags.get("ray_trial_id")
        if trial and run.info.end_time:
            out[trial] = (run.info.start_time / 1000, run.info.end_time / 1000)
    return out


def stage_seconds(spec: Spec) -> dict[str, float]:
    """Per stage key: the seconds its stage task recorded computing it."""
    out: dict[str, float] = {}
    for path in spec.storage.rglob(TASK_LOG):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["key"]] = out.get(row["key"], 0.0) + float(row["seconds"])
    return out


def ray_session_start(ray_tmp: Path) -> float | None:
    """When the local Ray's session began (its folder is named after that moment)."""
    for folder in sorted(ray_tmp.rglob("session_2*")):
        m = re.match(r"session_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+)_\d+$", folder.name)
        if m:
            return datetime.strptime(m.group(1), "%Y-%m-%d_%H-%M-%S_%f").timestamp()
    return None


def idle_gaps(spans: list[tuple[float, float, str]], t0: float, t1: float
              ) -> list[tuple[str, float]]:
    """Stretches of [t0, t1] with no trial running, labelled by the trials around them."""
    gaps, cur, prev = [], t0, "sweep start"
    for start, end, label in sorted(spans):
        if start > cur + 0.5:  # a hand-over between two trials is not a gap
            gaps.append((f"{prev} -> {label}", start - cur))
        if end > cur:
            cur, prev = end, label
    if t1 > cur + 0.5:
        gaps.append((f"{prev} -> sweep end", t1 - cur))
    return gaps


def running_at_once(spans: list[tuple[float, float]], t0: float, t1: float) -> dict[int, float]:
    """Seconds of [t0, t1] with k trials running, per k."""
    edges = sorted({t0, t1, *(min(max(x, t0), t1) for span in spans for x in span)})
    out: dict[int, float] = {}
    for a, b in itertools.pairwise(edges):
        k = sum(1 for s, e in spans if s <= a and e >= b)
        out[k] = out.get(k, 0.0) + b - a
    return out


# --------------------------------------------------------------------------- running the sweep

@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            raise SystemExit(f"--keep {keep}: the folder must be empty (a sweep refuses to "
                             "start over an earlier one)")
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="bench_eff_", ignore_cleanup_errors=True) as tmp:
        yield Path(tmp).resolve()


def run_in_process(spec: Spec, num_cpus: int) -> dict[str, float]:
    """``init_ray`` timed alone, then ``run_sweep`` (Ray already up)."""
    try:
        start = time.perf_counter()
        init_ray(None, num_cpus=num_cpus)
        ray_start = time.perf_counter() - start
        start, t0 = time.perf_counter(), time.time()
        # Its live view goes to stderr: stdout carries only this benchmark's Markdown section.
        with contextlib.redirect_stdout(sys.stderr):
            run_sweep(spec, num_cpus=num_cpus)
        return {"ray_start": ray_start, "t0": t0, "sweep_s": time.perf_counter() - start,
                "t1": time.time()}
    finally:
        ray.shutdown()


def run_launch(sweep: Path, overrides: list[str], num_cpus: int, cwd: Path,
               ray_tmp: Path) -> tuple[list[str], dict[str, float]]:
    """``python launch.py SWEEP`` in `cwd`, timed from start to exit."""
    argv = [sys.executable, str(REPO / "launch.py"), str(sweep), "--num-cpus", str(num_cpus)]
    for item in overrides:
        argv += ["--set", item]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log(f"running {shlex.join(argv)} in {cwd}")
    start, t0 = time.perf_counter(), time.time()
    # Its output goes to stderr: stdout carries only this benchmark's Markdown section.
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=sys.stderr, stderr=sys.stderr,
                          check=False)
    wall, t1 = time.perf_counter() - start, time.time()
    if proc.returncode != 0:
        raise SystemExit(f"the sweep exited with {proc.returncode} after {wall:.0f} s")
    return argv, {"wall_s": wall, "t0": t0, "t1": t1}


def per_method_baseline(sweep: Path, overrides: list[str], methods: list[str], num_cpus: int,
                        slots: float, root: Path, ray_tmp: Path) -> dict[str, float]:
    """The same study as one sweep per method, run one after another (what a user of a
    one-script-per-run tool does): per run, the Tune trials' busy time, their span and the
    command's wall clock; summed over the runs."""
    out = {"busy": 0.0, "span": 0.0, "wall": 0.0, "trials": 0.0}
    study = yaml.safe_load(sweep.read_text())
    for method in methods:
        cwd = root / method
        cwd.mkdir()
        # The study's file with one method: its search space keeps the shared keys and this
        # method's own (another method's keys are refused in a sweep that does not run it).
        one = {**study, "methods": [method], "name": f"{study['name']}_{method}"}
        one["search"] = {**study["search"], "space": {
            k: v for k, v in study["search"].get("space", {}).items()
            if k.split(".")[0] not in set(methods) - {method}}}
        path = cwd / sweep.name
        path.write_text(yaml.safe_dump(one, sort_keys=False))
        _, times = run_launch(path, overrides, num_cpus, cwd, ray_tmp)
        spec = load_spec(path, overrides, cwd=cwd)
        _, spans = experiment_state(tune_path(spec))
        if not spans:
            raise SystemExit(f"{method}: no Tune experiment state in {tune_path(spec)}")
        out["busy"] += sum(e - s for s, e in spans.values())
        out["span"] += max(e for _, e in spans.values()) - min(s for s, _ in spans.values())
        out["wall"] += times["wall_s"]
        out["trials"] += len(spans)
    out["eff_span"] = out["busy"] / slots / out["span"]
    out["eff_wall"] = out["busy"] / slots / out["wall"]
    return out


# --------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", type=Path, default=REPO / "sweeps" / "quickstart.yaml")
    p.add_argument("--launch", action="store_true",
                   help="run it as a user does: `python launch.py SWEEP` in a temp dir, timed "
                        "from start to exit (the quickstart's wall clock)")
    p.add_argument("--targets", nargs="+", default=None, help="default: the file's")
    p.add_argument("--samples", type=int, default=None,
                   help="search trials per pipeline (default: the file's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the file's")
    p.add_argument("--epochs", type=int, default=None,
                   help="train.epochs, and the only choice where the file searches it "
                        "(default: the file's)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="any other override, as launch.py --set")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--calibration-epochs", type=int, default=2)
    p.add_argument("--keep", type=Path, default=None,
                   help="run in this (empty) folder and keep what the sweep wrote")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 search trials per pipeline, 1 seed, 2 epochs, JTT's "
                        "identification model 1 epoch, 1 calibration epoch")
    p.add_argument("--per-method", action="store_true",
                   help="with --launch: also run the study as one sweep per method, one after "
                        "another, side by side (a few minutes more)")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file")
    args = p.parse_args()
    sweep = args.sweep.resolve()
    base = load_spec(sweep)
    if args.quick:
        args.samples, args.seeds, args.epochs = 2, [0], 2
        args.calibration_epochs = 1
        if "jtt" in base.methods:
            args.overrides.append("jtt.epochs_id=1")
    overrides: list[str] = []
    if args.targets:
        overrides.append(f"targets=[{', '.join(args.targets)}]")
    if args.samples is not None:
        overrides.append(f"search.num_samples={args.samples}")
    if args.seeds:
        overrides.append(f"seeds=[{', '.join(map(str, args.seeds))}]")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
        if any(d.path == "train.epochs" for d in base.space):
            overrides.append(f"search.space.train.epochs={{choice: [{args.epochs}]}}")
    overrides += args.overrides

    # A Ray of our own, never another's; a short path (Ray's socket paths must stay short).
    with workdir(args.keep) as tmp, tempfile.TemporaryDirectory(
            prefix="ray_", ignore_cleanup_errors=True) as ray_dir:
        ray_tmp = Path(ray_dir)
        os.environ["RAY_TMPDIR"] = str(ray_tmp)
        run_dir = tmp / "run"
        run_dir.mkdir()
        if args.launch:  # the file's relative storage and tracking, against the temp dir
            spec = load_spec(sweep, overrides, cwd=run_dir)
        else:
            spec = load_spec(sweep, [*overrides, f"storage={run_dir}/debias_results",
                                     f"tracking.uri=sqlite:///{run_dir}/mlflow.db"])
        calib_spec = load_spec(sweep, [*overrides, f"storage={tmp}/calibration",
                                       f"tracking.uri=sqlite:///{tmp}/calibration/mlflow.db"])
        cal = {}
        for method in spec.methods:
            log(f"calibrating {method} ({args.calibration_epochs} epoch(s)) ...")
            cal[method] = calibrate(calib_spec, method, args.calibration_epochs)
        if args.launch:
            argv, times = run_launch(sweep, overrides, args.num_cpus, run_dir, ray_tmp)
        else:
            argv, times = [], run_in_process(spec, args.num_cpus)
        folder = tune_path(spec)
        trials = tune_trials(folder)
        tune_start, spans = experiment_state(folder)
        walls = mlflow_walls(spec)
        stage_s = stage_seconds(spec)
        config_file = sweep_dir(spec) / CONFIG_FILE
        ray_up = config_file.stat().st_mtime if config_file.is_file() else None
        session = ray_session_start(ray_tmp)
        baseline = None
        if args.per_method and args.launch and len(spec.methods) > 1:
            (tmp / "per_method").mkdir()
            baseline = per_method_baseline(
                sweep, overrides, spec.methods, args.num_cpus,
                args.num_cpus / spec.resources.cpu, tmp / "per_method",
                ray_tmp)

    slots = args.num_cpus / spec.resources.cpu
    method_of = {pl.name: pl.method for pl in pipelines(spec)}
    ids = sorted(trials, key=lambda t: (trials[t].rows[0].get("timestamp", 0), t))
    for t in ids:
        trials[t].span = spans.get(t)
        trials[t].mlflow = walls.get(t)
    stages = [t for t in ids if trials[t].phase == STAGE_PHASE]
    runs = [t for t in ids if trials[t].phase != STAGE_PHASE]

    def busy_span(t: str) -> tuple[float, float]:
        """The Tune span; without Tune's state, MLflow's run, else the result stamps."""
        tr = trials[t]
        if tr.span:
            return tr.span
        if tr.mlflow:
            return tr.mlflow
        end = float(tr.rows[-1]["timestamp"])
        return end - float(tr.rows[-1]["time_total_s"]), end

    wall = {t: busy_span(t)[1] - busy_span(t)[0] for t in ids}
    total_s = {t: float(trials[t].rows[-1]["time_total_s"]) for t in ids}
    mlflow_busy = {t: (trials[t].mlflow[1] - trials[t].mlflow[0]) if trials[t].mlflow
                   else wall[t] for t in ids}
    epochs = {t: int(trials[t].rows[-1]["training_iteration"]) for t in runs}

    def samples(t: str) -> float:
        first = trials[t].rows[0]
        for key, value in first.items():
            if key.endswith(SAMPLE_KEYS) and isinstance(value, int | float):
                return float(value)
        return cal[method_of[trials[t].pipeline]]["samples"]

    def per_sample(t: str) -> float:
        return cal[method_of[trials[t].pipeline]]["per_sample"]

    epoch_train = {t: samples(t) * per_sample(t) for t in runs}
    compute = {t: epochs[t] * epoch_train[t] for t in runs}
    for t in stages:
        compute[t] = stage_s.get(str(trials[t].rows[-1].get("stage_key")), float("nan"))
    iters = {t: [float(r["time_this_iter_s"]) for r in trials[t].rows] for t in runs}
    setup = [it[0] - statistics.median(it[1:]) for it in iters.values() if len(it) > 1]
    per_epoch = [statistics.median(iters[t][1:]) - epoch_train[t] for t in runs
                 if len(iters[t]) > 1]

    # The windows: the sweep with Ray up, and with what comes before it.
    last_end = max(busy_span(t)[1] for t in ids)
    first_start = min(busy_span(t)[0] for t in ids)
    if args.launch:
        end = times["t1"]
        sweep_t0 = ray_up if ray_up is not None else (tune_start or times["t0"])
        sweep_s = end - sweep_t0
        whole_s = times["wall_s"]
        window = ("the sweep with Ray up (sweep config recorded after Ray's start -> exit)",
                  "the whole command (start -> exit, as a user waits)")
    else:
        end, sweep_t0 = times["t1"], times["t0"]
        sweep_s = times["sweep_s"]
        whole_s = sweep_s + times["ray_start"]
        window = ("`run_sweep`, Ray already up", "with Ray start-up (`ray.init` + `run_sweep`)")
    span_s = last_end - first_start
    gap_t0 = tune_start if tune_start is not None else sweep_t0
    gaps = idle_gaps([(*busy_span(t), trials[t].label) for t in ids], gap_t0, end)
    no_trial = sum(g for _, g in gaps)
    at_once = running_at_once([busy_span(t) for t in ids], gap_t0, end)
    busy_total = sum(wall.values())
    slot_idle = slots * (end - gap_t0) - busy_total

    def eff(seconds: dict[str, float], wall_s: float) -> float:
        return sum(seconds.values()) / slots / wall_s

    def mean(values: Any) -> float:
        values = [v for v in values if v == v]
        return statistics.mean(values) if values else float("nan")

    def fmt(x: float | None, digits: int = 1) -> str:
        return "n/a" if x is None or x != x else f"{x:.{digits}f}"

    counts = {ph: sum(1 for t in ids if trials[t].phase == ph)
              for ph in ("search", "seeds", STAGE_PHASE)}
    stage_names = sorted({trials[t].label.removeprefix("stage ") for t in stages})
    epochs_seen = sorted(set(epochs.values()))
    rel = sweep.relative_to(REPO) if sweep.is_relative_to(REPO) else sweep
    how = (f"`{shlex.join(['python', 'launch.py', str(rel), *argv[3:]])}` in a fresh temp dir "
           "(a subprocess, its own storage and sqlite MLflow store there)" if args.launch else
           f"`run_sweep` in this process on `{rel}` (temp storage, sqlite MLflow store)")
    lines = [
        "### Sweep efficiency: the quickstart study on a local Ray",
        "",
        f"`{command('benchmarks/bench_sweep_efficiency.py')}`",
        "",
        f"Machine: {machine(f'ray {ray.__version__}, CPU only')}. Date: {stamp()}.",
        f"{how}: methods {spec.methods}, targets {spec.targets}, "
        f"{spec.search.num_samples} search trials + {len(spec.seeds)} seeds per pipeline "
        f"({len(method_of)} pipelines, all in one Tune experiment): {len(ids)} Tune trials = "
        f"{counts['search']} search + {counts['seeds']} seeds + {counts[STAGE_PHASE]} stage "
        f"tasks ({', '.join(stage_names) or 'none'}); epochs per trial {epochs_seen}; "
        f"resources per trial {spec.resources.model_dump()}, local Ray num_cpus={args.num_cpus} "
        f"({slots:g} parallel slots). Stage tasks hold a slot like any trial: they are "
        "counted as busy time below.",
        "",
    ]
    if args.launch:
        lines += [f"**Quickstart wall clock** (the command, start to exit): "
                  f"**{times['wall_s']:.0f} s** ({times['wall_s'] / 60:.1f} min) on "
                  f"{args.num_cpus} CPUs.", ""]
    lines += [
        "| efficiency = (sum of busy times / slots) / wall time | within the trials' span "
        "(first trial running -> last trial's last result: what the scheduling controls) | "
        f"excluding start-up: {window[0]} | including it: {window[1]} |",
        "|---|---|---|---|",
        f"| slots busy (Tune trial RUNNING -> last result, driver clock; stage tasks "
        f"included) | {eff(wall, span_s):.2f} | **{eff(wall, sweep_s):.2f}** | "
        f"{eff(wall, whole_s):.2f} |",
        f"| same, trials' spans from their MLflow runs (start -> end, whole-second end) | "
        f"{eff(mlflow_busy, span_s):.2f} | {eff(mlflow_busy, sweep_s):.2f} | "
        f"{eff(mlflow_busy, whole_s):.2f} |",
        f"| trainable time (Ray `time_total_s`) | {eff(total_s, span_s):.2f} | "
        f"{eff(total_s, sweep_s):.2f} | {eff(total_s, whole_s):.2f} |",
        f"| training compute (trials: epochs x samples x measured time per sample; stage "
        f"tasks: their recorded compute) | {eff(compute, span_s):.2f} | "
        f"{eff(compute, sweep_s):.2f} | {eff(compute, whole_s):.2f} |",
        "",
        "| time | s |",
        "|---|---|",
    ]
    if args.launch:
        lines += [
            f"| the command, start to exit | {times['wall_s']:.1f} |",
            f"| start -> Ray's session begins (imports, plan, data check) | "
            f"{fmt(session - times['t0'] if session else None)} |",
            f"| Ray start-up (session begins -> sweep config recorded) | "
            f"{fmt(ray_up - session if ray_up and session else None)} |",
        ]
    else:
        lines += [f"| Ray start-up (`ray.init`, local, num_cpus={args.num_cpus}) | "
                  f"{times['ray_start']:.1f} |",
                  f"| sweep wall time (`run_sweep`, Ray already up) | {sweep_s:.1f} |"]
    lines += [
        f"| -> Tune's experiment starts (MLflow parent runs, Tuner set-up) | "
        f"{fmt(tune_start - sweep_t0 if tune_start else None)} |",
        f"| Tune's start -> first trial running | "
        f"{fmt(first_start - tune_start if tune_start else None)} |",
        f"| first trial running -> last trial's last result | {last_end - first_start:.1f} |",
        f"| last result -> {'exit' if args.launch else '`run_sweep` returns'} (MLflow "
        f"reconcile and flush{', report, Ray shutdown' if args.launch else ''}) | "
        f"{end - last_end:.1f} |",
        f"| busy time, sum over all Tune trials (slot-seconds) | {busy_total:.1f} |",
        f"| &nbsp;&nbsp;of which stage tasks ({len(stages)}) | "
        f"{sum(wall[t] for t in stages):.1f} |",
        f"| trial busy time, mean (search and seeds trials) | "
        f"{mean(wall[t] for t in runs):.2f} |",
        f"| trainable time, mean (Ray `time_total_s`) | {mean(total_s[t] for t in runs):.2f} |",
        f"| training compute per trial, mean | {mean(compute[t] for t in runs):.2f} |",
        f"| **per-trial overhead** = busy - training compute, mean | "
        f"**{mean(wall[t] - compute[t] for t in runs):.2f}** |",
        f"| of which Ray-side (busy - `time_total_s`: actor start, scheduling, result "
        f"handling) | {mean(wall[t] - total_s[t] for t in runs):.2f} |",
        f"| of which trial set-up (first iteration - a later one) | {mean(setup):.2f} |",
        f"| of which per epoch: evaluation + checkpoint + report (a later iteration - "
        f"training) | {mean(per_epoch):.2f} x {mean(epochs.values()):.1f} epochs |",
        f"| stage tasks: busy, mean / their recorded compute, mean | "
        f"{fmt(mean(wall[t] for t in stages), 2)} / "
        f"{fmt(mean(compute[t] for t in stages), 2)} |",
        "",
        "Measured in this process before the sweep, per method (torch threads = the trial's "
        f"CPUs; median of {args.calibration_epochs} epoch(s)):",
        "",
        "| method | samples per epoch | training s per epoch | evaluation s per epoch | "
        "set-up s (stages cached) |",
        "|---|---|---|---|---|",
        *(f"| {m} | {fmt(c['samples'], 0)} | {fmt(c['samples'] * c['per_sample'], 2)} | "
          f"{fmt(c['eval'], 2)} | {c['setup']:.2f} |" for m, c in cal.items()),
        "",
        "(JTT's samples per epoch in a trial are its upsampled size, read from the trial's "
        "first report. The training compute is measured alone, before the sweep; on a busy "
        "machine the trials' epochs are slower than that, and the difference lands in the "
        "per-epoch line.)",
        "",
        "Where the slots' idle time goes (from Tune's start to the end of the sweep):",
        "",
        "| idle | s |",
        "|---|---|",
        f"| slot-seconds idle = slots x (sweep end - Tune's start) - busy time | "
        f"{slot_idle:.1f} of {slots * (end - gap_t0):.1f} |",
        f"| of which with no trial running at all (x {slots:g} slots) | "
        f"{no_trial:.1f} x {slots:g} |",
        *(f"| &nbsp;&nbsp;{label} | {g:.1f} |" for label, g in gaps),
        f"| of which with fewer trials running than slots (the last wave, a trial waiting "
        f"for its stages with nothing else to run, start-up of a trial's worker) | "
        f"{slot_idle - slots * no_trial:.1f} |",
        "| time with 0 / 1 / 2 / ... trials running at once | "
        + " / ".join(f"{at_once.get(k, 0.0):.1f}"
                   for k in range(max(int(slots), *at_once) + 1)) + " |",
        "",
    ]
    if baseline is not None:
        one = {"busy": busy_total, "span": span_s, "wall": times["wall_s"]}
        lines += [
            "Side by side, in this run: the same study as one sweep per method "
            f"({', '.join(spec.methods)}), run one after another (each its own `launch.py` "
            "command, Ray start and report), against the one sweep above:",
            "",
            "| | one sweep, all pipelines in one Tuner | one sweep per method, one after another "
            "| ratio |",
            "|---|---|---|---|",
            f"| efficiency within the trials' span(s) | {one['busy'] / slots / one['span']:.2f} "
            f"| {baseline['eff_span']:.2f} | |",
            f"| efficiency over the command(s), start to exit | "
            f"{one['busy'] / slots / one['wall']:.2f} | {baseline['eff_wall']:.2f} | |",
            f"| busy slot-seconds (Tune trials and stage tasks) | {one['busy']:.0f} | "
            f"{baseline['busy']:.0f} | {one['busy'] / baseline['busy']:.2f} |",
            f"| wall clock, start to exit (s) | {one['wall']:.0f} | {baseline['wall']:.0f} | "
            f"**{one['wall'] / baseline['wall']:.2f}** |",
            "",
        ]
    lines += [
        "Every pipeline runs in one Tuner, its trials in critical-path order (search trials "
        "before seeds trials, pipelines whose seeds need stage tasks first): a slot idles "
        "only when no pipeline has a trial ready (a JTT trial waits for its stage tasks; a "
        "pipeline's seeds wait for its whole search; the last trials end one by one).",
        "",
    ]
    if slots >= 2 and max(at_once) < 2:
        lines += [
            "**No two trials ran at once in this run.** Likely cause (from Ray Tune's code, "
            "not measured here): Tune keeps at most one trial pending for a custom searcher, "
            "and with `reuse_actors` a finished trial's worker is handed to the pending trial, "
            "and the new worker still starting for it is removed; so whenever starting a "
            "worker (a Python process importing torch, Ray, debias) takes longer than a "
            "trial, as on a loaded machine or with very short trials, the second slot never "
            "gets a worker.",
            "",
        ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
