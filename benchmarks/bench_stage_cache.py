"""k-sweep with the stage cache vs recomputing the shared stages in every trial.

Runs the same 8 ClusterFix trials (k = 2..9, one after another, in this process) twice, side
by side in one run: once with one shared cache folder (the product's behaviour: the ERM
reference model and the features are computed by the first trial, k-means once per k) and
once with a fresh cache folder per trial (what a one-script-per-run codebase does). Reports
wall times and their ratio, plus the time spent in the shared stages alone.

    python benchmarks/bench_stage_cache.py [--epochs 2] [--ref-epochs 10] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from bench_common import command, machine, publish, stamp, timed_trial

from debias.spec import validate, with_params


def sweep(ks: list[int], cache_root: Path, shared: bool, epochs: int, ref_epochs: int,
          size: int) -> tuple[float, float]:
    """Total wall time of the k-sweep, and the part spent building trials (shared stages)."""
    spec = validate({
        "name": "bench", "method": "clusterfix", "targets": ["Odd"],
        "bias_attribute": "Background",
        "dataset": {"name": "synthetic", "image_size": size, "spurious_correlation": 0.9},
        "train": {"epochs": epochs, "batch_size": 64}, "reference": {"epochs": ref_epochs},
        "storage": str(cache_root)})
    total = prep = 0.0
    for i, k in enumerate(ks):
        config = with_params(spec.trial_base("Odd"), {"clusterfix.k": k})
        if not shared:
            config["cache_dir"] = str(cache_root / f"trial{i}")
        t, p = timed_trial(config)
        total, prep = total + t, prep + p
    return total, prep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="training epochs per trial")
    p.add_argument("--ref-epochs", type=int, default=10, help="reference-model epochs")
    p.add_argument("--size", type=int, default=32, help="image size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="append the result to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ks = list(range(2, 10))
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        cached, cached_prep = sweep(ks, Path(a), True, args.epochs, args.ref_epochs, args.size)
        fresh, fresh_prep = sweep(ks, Path(b), False, args.epochs, args.ref_epochs, args.size)
    lines = [
        f"### Stage cache: ClusterFix k-sweep ({len(ks)} values of k)",
        "",
        f"`{command('benchmarks/bench_stage_cache.py')}`",
        "",
        f"Machine: {machine(f'{args.threads} torch thread(s), CPU only')}. Date: {stamp()}.",
        "",
        "| | with the cache | recomputed per trial | ratio |",
        "|---|---|---|---|",
        f"| k-sweep wall time | {cached:.1f} s | {fresh:.1f} s | {cached / fresh:.2f} |",
        f"| of which shared stages (reference, features, k-means) | {cached_prep:.1f} s | "
        f"{fresh_prep:.1f} s | {cached_prep / fresh_prep:.2f} |",
        "",
    ]
    text = "\n".join(lines)
    publish(text, args.out)


if __name__ == "__main__":
    main()
