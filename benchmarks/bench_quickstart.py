"""What the quickstart can afford: for ERM to learn the embedded task (test average accuracy
>= 80% over the reported seeds) while the whole study (ERM, JTT, GroupDRO; 3 search trials +
3 seeds each) ends in 4 minutes on 2 CPU cores.

1. ERM trials at each (image size, backbone, epochs) of a grid, with the product's own
   training code (lr 0.1, SGD, batch 64, cosine; the epoch of best validation WGA is the one
   scored), seeds 0-2, two trials at a time with one torch thread each, as the quickstart's
   two slots run them: test average accuracy, test WGA, seconds per epoch. A quickstart trial
   can cost about 20 s (240 s x 2 slots, less start-up and stage tasks, over 18 trials).
2. The quickstart itself, as a new user runs it (`.venv/bin/python launch.py
   sweeps/quickstart.yaml` in a fresh folder): its wall clock, its table (from its
   report.csv), and how many lines it printed.

    python benchmarks/bench_quickstart.py [--seeds 0,1,2] [--no-grid] [--quick] [--out F]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench_common import command, machine, publish, stamp

REPO = Path(__file__).resolve().parents[1]
#: (image size, backbone arch, epochs): the quickstart's old setting, then the candidates.
GRID = [(16, "small_cnn", 10), (16, "small_cnn", 16), (20, "small_cnn", 14),
        (24, "small_cnn", 12), (32, "small_cnn", 10), (16, "small_cnn_w16", 24),
        (20, "small_cnn_w16", 16), (20, "small_cnn_w16", 24), (32, "small_cnn_w16", 20)]
QUICK_GRID = [(16, "small_cnn", 2), (20, "small_cnn_w16", 2)]
LR = 0.1


def trial(size: int, arch: str, epochs: int, seed: int) -> dict[str, Any]:
    """One ERM trial to its end, in this (worker) process, on one torch thread."""
    import torch

    from debias.spec import validate, with_params
    from debias.trainable import build_trial

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as storage:
        spec = validate({
            "name": "bench_quickstart", "method": "erm", "targets": ["Odd"],
            "bias_attribute": "Background",
            "dataset": {"name": "synthetic", "image_size": size, "spurious_correlation": 0.95},
            "backbone": {"arch": arch, "weights": "none"},
            "train": {"epochs": epochs, "batch_size": 64, "optimizer": "sgd", "lr": LR,
                      "weight_decay": 1e-4, "scheduler": "cosine"},
            "storage": storage})
        built = build_trial(with_params(spec.trial_base("Odd"), {"seed": seed}), device="cpu")
        start = time.perf_counter()
        last: dict[str, Any] = {}
        for metrics in built.epochs():
            last = metrics
        wall = time.perf_counter() - start
    return {"size": size, "arch": arch, "epochs": epochs, "seed": seed, "wall": wall,
            "avg": last["test/avg_acc"], "wga": last["test/worst_group_acc"]}


def grid(settings: list[tuple[int, str, int]], seeds: list[int]) -> list[dict[str, Any]]:
    jobs = [(*s, seed) for s, seed in itertools.product(settings, seeds)]
    with ProcessPoolExecutor(2) as pool:  # two at a time: the quickstart's two slots
        return list(pool.map(trial, *zip(*jobs, strict=True)))


def quickstart() -> dict[str, Any]:
    """The first README command's sweep, timed start to exit in a fresh folder."""
    with tempfile.TemporaryDirectory() as work:
        os.symlink(REPO / "sweeps", Path(work) / "sweeps")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("RAY_ADDRESS", None)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "launch.py"),
                               "sweeps/quickstart.yaml"], cwd=work, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"the quickstart exited {done.returncode}:\n{done.stdout[-3000:]}")
        with (Path(work) / "debias_results" / "quickstart" / "report.csv").open() as fh:
            rows = list(csv.DictReader(fh))
    return {"wall": wall, "rows": rows, "lines": len(done.stdout.splitlines())}


def _pct(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else \
        f"{mean:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--no-grid", action="store_true", help="the quickstart run only")
    p.add_argument("--quick", action="store_true", help="2 epochs, one seed: a smoke run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    results = [] if args.no_grid else grid(QUICK_GRID if args.quick else GRID, seeds)
    qs = quickstart()

    lines = ["### Quickstart: what ERM needs to learn the task in 4 minutes", "",
             f"`{command('benchmarks/bench_quickstart.py')}`", "",
             f"Machine: {machine()}. Date: {stamp()}. Whole run: "
             f"{(time.perf_counter() - started) / 60:.0f} min.", ""]
    if results:
        lines += [
            f"ERM alone (target `Odd`, bias `Background`, correlation 0.95; lr {LR}, SGD, batch "
            "64, cosine; the epoch of best validation WGA scored), seeds "
            f"{', '.join(map(str, seeds))}, two trials at a time on one torch thread each (as "
            "the quickstart's two slots run them); mean ± std over seeds:", "",
            "| image size | backbone | epochs | s per epoch | s per trial | test avg acc % "
            "| test WGA % |", "|---|---|---|---|---|---|---|"]
        for size, arch, epochs in dict.fromkeys((r["size"], r["arch"], r["epochs"])
                                                for r in results):
            mine = [r for r in results if (r["size"], r["arch"], r["epochs"]) ==
                    (size, arch, epochs)]
            wall = statistics.fmean(r["wall"] for r in mine)
            lines.append(f"| {size} px | `{arch}` | {epochs} | {wall / epochs:.2f} | "
                         f"{wall:.0f} | {_pct([r['avg'] for r in mine])} | "
                         f"{_pct([r['wga'] for r in mine])} |")
        lines += ["", "A quickstart trial can cost about 20 s (240 s x 2 slots, less "
                  "start-up and the stage tasks, over 18 trials); 32 px needs about 20 epochs "
                  "of `small_cnn` (\"Embedded dataset\" below: 84% at 100 s a trial).", ""]
    table = "\n".join(f"| {r['method']} | {100 * float(r['test_wga_mean']):.1f} ± "
                      f"{100 * float(r['test_wga_ci95']):.1f} | "
                      f"{100 * float(r['test_avg_mean']):.1f} ± "
                      f"{100 * float(r['test_avg_ci95']):.1f} |" for r in qs["rows"])
    lines += [f"**The quickstart** (`sweeps/quickstart.yaml` as shipped, from start to exit): "
              f"**{qs['wall']:.0f} s** on this machine, {qs['lines']} lines printed; its "
              "table (mean ± 95% CI over its 3 seeds):", "",
              "| method | test WGA % | test avg acc % |", "|---|---|---|", table, ""]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
