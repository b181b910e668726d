"""SLIM on the embedded dataset: what a trial costs in each retrain mode, and what the stage
cache saves a sweep over retraining knobs.

Side by side in one run, in this process, one trial after another:

1. a sweep of last-layer trials that differ only in retraining knobs (the number of
   retrains), once with one shared cache folder (the product: reference model, GradCAM on
   validation, features and curations computed once) and once with a fresh cache per trial
   (what a one-script-per-run codebase does);
2. one full-retraining trial and one last-layer trial, both on a warm cache (the shared
   stages already computed), so the ratio is the retraining alone.

    python benchmarks/bench_slim_modes.py [--epochs 32] [--ref-epochs 10] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_common import command, machine, publish, stamp, timed_trial

from debias.spec import validate, with_params

SLIM = {"budget_per_class": 15, "keep_quantile": 0.0, "cell_share": "uniform"}


def _config(storage: Path, retrain: str, epochs: int, ref_epochs: int, size: int,
            **params: Any) -> dict[str, Any]:
    spec = validate({
        "name": "bench", "method": "slim", "targets": ["Odd"], "bias_attribute": "Background",
        "dataset": {"name": "synthetic", "image_size": size, "spurious_correlation": 0.9},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.05, "scheduler": "cosine"},
        "reference": {"epochs": ref_epochs},
        "slim": {**SLIM, "retrain": retrain,
                 "curated_size": 400 if retrain == "full" else 120},
        "storage": str(storage)})
    return with_params(spec.trial_base("Odd"), params)


def knob_sweep(root: Path, shared: bool, retrains: list[int], args: argparse.Namespace
               ) -> tuple[float, float]:
    total = prep = 0.0
    for i, r in enumerate(retrains):
        config = _config(root, "last_layer", args.epochs, args.ref_epochs, args.size,
                         **{"slim.retrains": r})
        if not shared:
            config["cache_dir"] = str(root / f"trial{i}")
        t, p = timed_trial(config)
        total, prep = total + t, prep + p
    return total, prep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=32, help="full-retraining epochs")
    p.add_argument("--ref-epochs", type=int, default=10, help="reference-model epochs")
    p.add_argument("--size", type=int, default=32, help="image size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="append the result to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    retrains = [2, 4, 6, 8]
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        cached, cached_prep = knob_sweep(Path(a), True, retrains, args)
        fresh, fresh_prep = knob_sweep(Path(b), False, retrains, args)
        # Warm cache for both modes (the full-mode stages are computed by a first, untimed trial).
        timed_trial(_config(Path(a), "full", 1, args.ref_epochs, args.size))
        full, _ = timed_trial(_config(Path(a), "full", args.epochs, args.ref_epochs, args.size))
        last, _ = timed_trial(_config(Path(a), "last_layer", args.epochs, args.ref_epochs,
                                    args.size, **{"slim.retrains": 5}))
    lines = [
        f"### SLIM: retrain modes and the stage cache ({len(retrains)}-trial knob sweep)",
        "",
        f"`{command('benchmarks/bench_slim_modes.py')}`",
        "",
        f"Machine: {machine(f'{args.threads} torch thread(s), CPU only')}. Date: {stamp()}.",
        "",
        "| | with the cache | recomputed per trial | ratio |",
        "|---|---|---|---|",
        f"| last-layer sweep over `slim.retrains` {retrains}, wall time | {cached:.1f} s | "
        f"{fresh:.1f} s | {cached / fresh:.2f} |",
        f"| of which shared stages (reference, GradCAM, features, curations) | "
        f"{cached_prep:.1f} s | {fresh_prep:.1f} s | {cached_prep / fresh_prep:.2f} |",
        "",
        "| one trial on a warm cache | last layer (49 grid points x 5 retrains) | full "
        f"retraining ({args.epochs} epochs, 400 images) | ratio |",
        "|---|---|---|---|",
        f"| wall time | {last:.2f} s | {full:.1f} s | {last / full:.3f} |",
        "",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
