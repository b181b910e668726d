"""The product's training loop vs a bare PyTorch loop, images/s, side by side in one run.

Product: ``Trainer.train_one_epoch`` (ERM, small_cnn, synthetic 32 px, batch 64, SGD), i.e.
per-epoch seeding, a DataLoader over the grouped dataset, label lookup by position, the
method's loss, the optimiser. Its per-epoch evaluation (val, and test when the selection
improves) is timed separately and left out of its images/s.
Bare: the same model from ``debias.models.build_classifier``, the same optimiser settings and
batch size, the same training images already in memory as one normalised float tensor,
``randperm`` + index + forward + cross-entropy + backward + step.

The two alternate (A B A B ...) so drifting machine load hits both; the ratio of each round
is product/bare and the median is reported. Target: >= 0.9. A cProfile breakdown of one
product epoch is printed when the ratio misses the target (or with --profile).

    python benchmarks/bench_training_loop.py [--rounds 5] [--epochs 3] [--threads 1]
        [--profile] [--quick] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import command, machine, publish, stamp

from debias.data.transforms import normalize_uint8
from debias.engine import Trainer
from debias.models import build_classifier
from debias.spec import validate
from debias.trainable import build_trial

TARGET = 0.9


def trial_config(storage: Path, size: int, batch: int) -> dict[str, Any]:
    spec = validate({
        "name": "bench", "method": "erm", "targets": ["Odd"], "bias_attribute": "Background",
        "dataset": {"name": "synthetic", "image_size": size},
        "backbone": {"arch": "small_cnn", "weights": "none"},
        "train": {"epochs": 10_000, "batch_size": batch, "optimizer": "sgd", "lr": 0.05,
                  "weight_decay": 1.0e-4},
        "storage": str(storage)})
    return spec.trial_base("Odd")


class Product:
    """A Trainer whose evaluation is timed on the side."""

    def __init__(self, config: dict[str, Any]) -> None:
        trial = build_trial(config, device="cpu")  # as a sweep's trial builds it
        assert isinstance(trial, Trainer), "ERM trains by SGD epochs: the engine's Trainer"
        self.trainer = trial
        self.eval_s = 0.0
        evaluate = self.trainer.evaluate

        def timed(split: str) -> dict[str, float]:
            start = time.perf_counter()
            try:
                return evaluate(split)
            finally:
                self.eval_s += time.perf_counter() - start

        self.trainer.evaluate = timed  # type: ignore[method-assign]
        self.images = len(self.trainer.train_set)

    def run(self, epochs: int) -> tuple[float, float]:
        """(training seconds without evaluation, evaluation seconds) for `epochs` epochs."""
        self.eval_s = 0.0
        start = time.perf_counter()
        for _ in range(epochs):
            self.trainer.train_one_epoch()
        total = time.perf_counter() - start
        return total - self.eval_s, self.eval_s


class Bare:
    """The loop anyone would write by hand over an in-memory tensor."""

    def __init__(self, trainer: Trainer) -> None:
        cfg = trainer.train_cfg
        view = trainer.data.view("train")
        assert trainer.data.images is not None
        self.x = normalize_uint8(trainer.data.images[view.index])
        self.y = torch.from_numpy(view.y.copy())
        torch.manual_seed(0)
        self.model = build_classifier("small_cnn", "none", {"target": trainer.data.n_classes})
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr,
                                   momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.batch = cfg.batch_size
        self.images = len(self.x)
        self.epoch = 0

    def run(self, epochs: int) -> float:
        start = time.perf_counter()
        for _ in range(epochs):
            self.model.train()
            perm = torch.randperm(self.images, generator=torch.Generator().manual_seed(
                self.epoch))
            total = 0.0
            for i in range(0, self.images, self.batch):
                idx = perm[i:i + self.batch]
                loss = torch.nn.functional.cross_entropy(self.model(self.x[idx]), self.y[idx])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                total += float(loss.detach()) * len(idx)
            self.epoch += 1
        return time.perf_counter() - start


# Where one product epoch spends its time, by cProfile's cumulative time of these functions
# (file suffix, function name); "other" is the epoch's remaining time (per-batch Python in
# train_one_epoch itself: label lookup by position, loss accumulation, the loop).
PHASES: list[tuple[str, str, str]] = [
    ("data: DataLoader iteration (dataset __getitems__ + collate)",
     "torch/utils/data/dataloader.py", "__next__"),
    ("  of which dataset __getitems__", "debias/data/grouped.py", "__getitems__"),
    ("  of which default_collate", "torch/utils/data/_utils/collate.py", "default_collate"),
    ("forward + loss (Method.loss)", "debias/methods/base.py", "loss"),
    ("backward", "torch/_tensor.py", "backward"),
    ("optimizer step", "torch/optim/sgd.py", "step"),
    ("zero_grad", "torch/optim/optimizer.py", "zero_grad"),
    ("DataLoader construction + first iter()", "torch/utils/data/dataloader.py", "__iter__"),
    ("per-epoch evaluation (val, test)", "debias/engine.py", "evaluate"),
]
TOP_LEVEL = {0, 3, 4, 5, 6, 7, 8}  # rows that do not overlap each other


def profile_epoch(product: Product) -> list[str]:
    prof = cProfile.Profile()
    prof.runcall(product.trainer.train_one_epoch)
    stats = pstats.Stats(prof)
    cum: dict[tuple[str, str], float] = {}
    total = 0.0
    for (filename, _, func), (_, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        path = filename.replace(os.sep, "/")
        if path.endswith("debias/engine.py") and func == "train_one_epoch":
            total = ct
        for _, suffix, name in PHASES:
            if path.endswith(suffix) and func == name:
                cum[(suffix, name)] = cum.get((suffix, name), 0.0) + ct
    rows = ["| phase (one product epoch, under cProfile) | s | share |", "|---|---|---|"]
    accounted = 0.0
    for i, (label, suffix, name) in enumerate(PHASES):
        t = cum.get((suffix, name), 0.0)
        if i in TOP_LEVEL:
            accounted += t
        rows.append(f"| {label} | {t:.3f} | {t / total:.0%} |")
    rows.append(f"| other (Python in train_one_epoch: label lookup, loss sum, loop) | "
                f"{total - accounted:.3f} | {(total - accounted) / total:.0%} |")
    rows.append(f"| **train_one_epoch total** | {total:.3f} | 100% |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds (median ratio reported)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (a quickstart trial holds 1 CPU)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="always print the profile table")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 epoch")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.epochs = 2, 1
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as storage:
        product = Product(trial_config(Path(storage), args.size, args.batch_size))
        bare = Bare(product.trainer)
        product.run(1)  # warm-up: allocator, first DataLoader, lazy imports
        bare.run(1)
        ratios, prod_ips, bare_ips, eval_share = [], [], [], []
        for _ in range(args.rounds):
            train_s, eval_s = product.run(args.epochs)
            bare_s = bare.run(args.epochs)
            a = product.images * args.epochs / train_s
            b = bare.images * args.epochs / bare_s
            prod_ips.append(a)
            bare_ips.append(b)
            ratios.append(a / b)
            eval_share.append(eval_s / train_s)
        ratio = statistics.median(ratios)
        profile = profile_epoch(product) if args.profile or ratio < TARGET else []

    verdict = "meets" if ratio >= TARGET else "misses"
    lines = [
        "### Training loop: product vs bare PyTorch",
        "",
        f"`{command('benchmarks/bench_training_loop.py')}`",
        "",
        f"Machine: {machine(f'{args.threads} torch thread(s), CPU only')}. Date: {stamp()}.",
        f"ERM, small_cnn, synthetic {args.size} px, batch {args.batch_size}, SGD; "
        f"{product.images} training images; {args.rounds} alternating rounds of "
        f"{args.epochs} epoch(s) each, after one warm-up epoch of each.",
        "",
        "| | product (`Trainer.train_one_epoch`) | bare loop | ratio product/bare |",
        "|---|---|---|---|",
        f"| images/s, median | {statistics.median(prod_ips):.0f} | "
        f"{statistics.median(bare_ips):.0f} | **{ratio:.2f}** (target >= {TARGET}: {verdict}) |",
        f"| ratio per round | | | {', '.join(f'{r:.2f}' for r in ratios)} |",
        f"| per-epoch evaluation, not in the images/s above | "
        f"+{statistics.median(eval_share):.0%} of the training time | none | |",
        "",
    ]
    if profile:
        lines += [*profile, ""]
    text = "\n".join(lines)
    publish(text, args.out)


if __name__ == "__main__":
    main()
