"""Sweep efficiency of a quickstart-sized sweep on a local Ray, and where the rest goes.

Efficiency = (sum of trial training times / parallel slots) / sweep wall time, i.e. the share
of the slots' time that trials spent training. Reported three ways, from the broadest to the
strictest notion of "trial time":

- slots busy: a trial's wall time as the driver saw it (its MLflow run, opened when Ray
  starts the trial and closed when it completes);
- trainable time: Ray's ``time_total_s``, the trainable's own run time (building the trial,
  its epochs with evaluation, checkpoints, reports);
- training compute: epochs x one epoch's training time, measured in this process on the same
  config before Ray starts (Trainer.train_one_epoch minus its evaluation, 1 torch thread as a
  trial gets), the only part that is "the work".

Also: Ray start-up time (``ray.init``, not part of the sweep wall time; a second figure
includes it), and per trial the overhead = wall time minus its epochs' training compute,
split into Ray-side (wall - time_total_s), trial set-up (first iteration minus a later one)
and per-epoch evaluation + checkpoint + report.

    python benchmarks/bench_sweep_efficiency.py [--targets Odd Loopy] [--samples 4]
        [--seeds 0 1 2] [--epochs 4] [--quick] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from bench_common import command, machine, publish, stamp
from mlflow.tracking import MlflowClient

from debias.engine import Trainer
from debias.spec import Spec, load_spec
from debias.sweep import init_ray, run_sweep

REPO = Path(__file__).resolve().parents[1]
NUM_CPUS = 2


def calibrate(spec: Spec, epochs: int) -> dict[str, float]:
    """One trial's pieces, in this process with the CPUs a trial holds: set-up, training
    per epoch (without evaluation), evaluation per epoch."""
    torch.set_num_threads(max(1, int(spec.config["resources"]["cpu"])))
    config = spec.trial_base(spec.targets[0])
    start = time.perf_counter()
    trainer = Trainer(config, device="cpu")
    setup = time.perf_counter() - start
    spent = {"eval": 0.0}
    evaluate = trainer.evaluate

    def timed(split: str) -> dict[str, float]:
        t = time.perf_counter()
        try:
            return evaluate(split)
        finally:
            spent["eval"] += time.perf_counter() - t

    trainer.evaluate = timed  # type: ignore[method-assign]
    train, evals = [], []
    for _ in range(epochs):
        spent["eval"] = 0.0
        t = time.perf_counter()
        trainer.train_one_epoch()
        train.append(time.perf_counter() - t - spent["eval"])
        evals.append(spent["eval"])
    return {"setup": setup, "train": statistics.median(train), "eval": statistics.median(evals)}


def ray_trials(spec: Spec) -> dict[str, dict[str, Any]]:
    """Per Ray trial id: its phase and the result.json rows Ray wrote for it."""
    out: dict[str, dict[str, Any]] = {}
    for path in (spec.storage / spec.name).glob("*/*/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[-1]["trial_id"]] = {"phase": path.parent.parent.name, "rows": rows,
                                         "target": path.parent.parent.parent.name}
    return out


def mlflow_walls(spec: Spec) -> dict[str, tuple[float, float]]:
    """Per Ray trial id: its MLflow run's start and end (epoch seconds)."""
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    assert exp is not None
    out = {}
    for run in client.search_runs([exp.experiment_id], max_results=10_000):
        trial = run.data.tags.get("ray_trial_id")
        if trial and run.info.end_time:
            out[trial] = (run.info.start_time / 1000, run.info.end_time / 1000)
    return out


def idle_gaps(spans: list[tuple[float, float, str]], t0: float, t1: float
              ) -> list[tuple[str, float]]:
    """Stretches of [t0, t1] with no trial running, labelled by the phases around them."""
    gaps, cur, prev = [], t0, "sweep start"
    for start, end, label in sorted(spans):
        if start > cur + 0.5:  # a hand-over between two trials is not a gap
            gaps.append((f"{prev} -> {label}", start - cur))
        if end > cur:
            cur, prev = end, label
    if t1 > cur + 0.5:
        gaps.append((f"{prev} -> sweep end", t1 - cur))
    return gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", type=Path, default=REPO / "sweeps" / "quickstart.yaml")
    p.add_argument("--targets", nargs="+", default=["Odd", "Loopy"])
    p.add_argument("--samples", type=int, default=4, help="search trials per target")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 target, 2 search trials, 2 seeds, 2 epochs")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file")
    args = p.parse_args()
    if args.quick:
        args.targets, args.samples, args.seeds, args.epochs = ["Odd"], 2, [0, 1], 2

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "name=bench_efficiency", f"storage={tmp}/results",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"targets=[{', '.join(args.targets)}]", f"search.num_samples={args.samples}",
            f"seeds=[{', '.join(map(str, args.seeds))}]", f"train.epochs={args.epochs}",
            "resources.cpu=1", "resources.gpu=0",
        ]
        spec = load_spec(args.sweep, overrides)
        cal = calibrate(spec, max(2, args.epochs))
        try:
            start = time.perf_counter()
            init_ray(None, num_cpus=NUM_CPUS)
            ray_start = time.perf_counter() - start
            start, t0 = time.perf_counter(), time.time()
            run_sweep(spec, num_cpus=NUM_CPUS)
            sweep_s, t1 = time.perf_counter() - start, time.time()
        finally:
            ray.shutdown()
        trials = ray_trials(spec)
        walls = mlflow_walls(spec)

    slots = NUM_CPUS / float(spec.config["resources"]["cpu"])
    ids = sorted(trials)
    total_s = {t: float(trials[t]["rows"][-1]["time_total_s"]) for t in ids}
    epochs = {t: int(trials[t]["rows"][-1]["training_iteration"]) for t in ids}
    wall = {t: walls[t][1] - walls[t][0] if t in walls else float("nan") for t in ids}
    gaps = idle_gaps([(*walls[t], f"{trials[t]['target']}/{trials[t]['phase']}")
                      for t in ids if t in walls], t0, t1)
    no_trial = sum(g for _, g in gaps)
    slot_idle = slots * sweep_s - sum(wall.values())
    compute = {t: epochs[t] * cal["train"] for t in ids}
    iters = {t: [float(r["time_this_iter_s"]) for r in trials[t]["rows"]] for t in ids}
    setup = [it[0] - statistics.median(it[1:]) for it in iters.values() if len(it) > 1]
    later = [statistics.median(it[1:]) for it in iters.values() if len(it) > 1]

    def eff(seconds: dict[str, float], wall_s: float) -> float:
        return sum(seconds.values()) / slots / wall_s

    def mean(values: Any) -> float:
        values = list(values)
        return statistics.mean(values) if values else float("nan")

    n = len(ids)
    phases = {ph: sum(1 for t in ids if trials[t]["phase"] == ph) for ph in ("search", "seeds")}
    lines = [
        "### Sweep efficiency: quickstart-sized sweep on a local Ray",
        "",
        f"`{command('benchmarks/bench_sweep_efficiency.py')}`",
        "",
        f"Machine: {machine(f'ray {ray.__version__}, CPU only')}. Date: {stamp()}.",
        f"`{args.sweep.relative_to(REPO) if args.sweep.is_relative_to(REPO) else args.sweep}` "
        f"with targets {args.targets}, {args.samples} search trials + {len(args.seeds)} seeds "
        f"per target ({n} trials: {phases['search']} search, {phases['seeds']} seeds), "
        f"{args.epochs} epochs, resources cpu 1, local Ray num_cpus={NUM_CPUS} "
        f"({slots:g} parallel slots), temp storage, sqlite MLflow store.",
        "",
        "| efficiency = (sum of trial times / slots) / sweep wall time | excluding Ray start-up"
        " | including it |",
        "|---|---|---|",
        f"| slots busy (trial wall time, MLflow run start to end) | {eff(wall, sweep_s):.2f} | "
        f"{eff(wall, sweep_s + ray_start):.2f} |",
        f"| trainable time (Ray `time_total_s`) | **{eff(total_s, sweep_s):.2f}** | "
        f"{eff(total_s, sweep_s + ray_start):.2f} |",
        f"| training compute (epochs x measured epoch training time) | "
        f"{eff(compute, sweep_s):.2f} | {eff(compute, sweep_s + ray_start):.2f} |",
        "",
        "| time | s |",
        "|---|---|",
        f"| Ray start-up (`ray.init`, local, num_cpus={NUM_CPUS}) | {ray_start:.1f} |",
        f"| sweep wall time (`run_sweep`, Ray already up) | {sweep_s:.1f} |",
        f"| trial wall time, mean (MLflow) | {mean(wall.values()):.2f} |",
        f"| trainable time, mean (Ray `time_total_s`) | {mean(total_s.values()):.2f} |",
        f"| training compute per trial ({args.epochs} x {cal['train']:.2f} s, measured "
        f"in-process) | {args.epochs * cal['train']:.2f} |",
        f"| **per-trial overhead** = wall - training compute, mean | "
        f"**{mean(wall[t] - compute[t] for t in ids):.2f}** |",
        f"| of which Ray-side (wall - `time_total_s`: actor start, scheduling, result "
        f"handling) | {mean(wall[t] - total_s[t] for t in ids):.2f} |",
        f"| of which trial set-up (first iteration - a later one; in-process Trainer() "
        f"takes {cal['setup']:.2f}) | {mean(setup):.2f} |",
        f"| of which per epoch: evaluation + checkpoint + report (a later iteration - "
        f"training; in-process evaluation alone {cal['eval']:.2f}) | "
        f"{mean(x - cal['train'] for x in later):.2f} x {args.epochs} |",
        "",
        "(The training compute is measured alone, before Ray starts; on a busy machine the "
        "trials' epochs are slower than that, and the difference lands in the per-epoch line.)",
        "",
        "Where the slots' idle time goes (trial spans from MLflow):",
        "",
        "| idle | s |",
        "|---|---|",
        f"| slot-seconds idle = slots x sweep wall - sum of trial wall times | "
        f"{slot_idle:.1f} of {slots * sweep_s:.1f} |",
        f"| of which with no trial running at all (x {slots:g} slots) | "
        f"{no_trial:.1f} x {slots:g} |",
        *(f"| &nbsp;&nbsp;{label} | {g:.1f} |" for label, g in gaps),
        f"| of which with fewer trials running than slots (a phase's last wave, start-up "
        f"of a trial's worker) | {slot_idle - slots * no_trial:.1f} |",
        "",
        "Phases run one after another (a target's seeds wait for its search; targets in "
        "turn), and each phase is its own Tuner: the gaps between them are Tune's set-up and "
        "teardown, new trial processes (import of torch, Ray, debias), and MLflow "
        "bookkeeping.",
        "",
    ]
    text = "\n".join(lines)
    publish(text, args.out)


if __name__ == "__main__":
    main()
