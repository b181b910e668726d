"""GPU path: images/s of the product's training step vs a bare PyTorch loop (ResNet-50,
224 px, bf16 autocast + channels_last), and trials/hour with 1 vs 4 trials per GPU.

Needs a CUDA GPU; on a machine without one it says so and exits 0 (BENCHMARKS.md records
that the figures were not measured there).

    python benchmarks/bench_gpu.py [--steps 50] [--batch 128] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bench_common import publish
from torch.nn import functional as F

from debias.models import build_classifier


def bare_loop(steps: int, batch: int, amp: bool, channels_last: bool) -> float:
    """images/s of the plainest training loop: one model, one batch on the GPU, SGD."""
    model = build_classifier("resnet50", "none", {"target": 2}).cuda()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device="cuda")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def product_loop(steps: int, batch: int, amp: bool, channels_last: bool) -> float:
    """images/s of debias.engine.Trainer's step on in-memory synthetic images at 224 px."""
    from debias.engine import Trainer
    from debias.spec import validate, with_params
    from debias.trainable import build_trial

    spec = validate({
        "name": "gpu", "targets": ["Odd"], "bias_attribute": "Background",
        "dataset": {"name": "synthetic", "image_size": 224},
        "backbone": {"arch": "resnet50", "weights": "none"},
        "train": {"epochs": 1, "batch_size": batch, "amp": amp, "channels_last": channels_last,
                  "num_workers": 4},
        "storage": "/tmp/debias_gpu_bench"})
    trainer = build_trial(with_params(spec.trial_base("Odd"), {}), device="cuda")
    assert isinstance(trainer, Trainer), "ERM trains by SGD epochs: the engine's Trainer"
    n = len(trainer.train_set)
    torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_one_epoch()
    torch.cuda.synchronize()
    del steps
    return n / (time.perf_counter() - start)


def trials_per_hour(per_gpu: int, epochs: int) -> float:
    """Run a small synthetic sweep with resources.gpu = 1/per_gpu; trials finished per hour.

    The quickstart's file, narrowed to plain ERM (no shared stages: every Tune trial is a
    training trial) with only the learning rate searched, so `train.epochs` holds: 2 x
    per_gpu search trials and one seed, each in a fresh storage and MLflow store (a sweep
    refuses to start over an earlier one of the same name)."""
    trials = 2 * per_gpu
    with tempfile.TemporaryDirectory(prefix="debias_gpu_pack_") as tmp:
        start = time.perf_counter()
        subprocess.run([
            sys.executable, "launch.py", "sweeps/quickstart.yaml",
            "--set", f"name=gpu_pack_{per_gpu}", "--set", f"storage={tmp}/results",
            "--set", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            "--set", f"resources={{cpu: 1, gpu: {1 / per_gpu}}}",
            "--set", "methods=[erm]",
            "--set", "search.space={train.lr: {float: [0.02, 0.1], log: true}}",
            "--set", f"search.num_samples={trials}", "--set", "seeds=[0]",
            "--set", "targets=[Odd]", "--set", f"train.epochs={epochs}",
            "--set", "backbone={arch: resnet18, weights: none}",
            "--set", "dataset.image_size=64",
        ], check=True, cwd=Path(__file__).resolve().parents[1])
        return (trials + 1) / ((time.perf_counter() - start) / 3600)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine; nothing measured.")
        return
    name = torch.cuda.get_device_name()
    rows = []
    for amp, cl in ((False, False), (True, True)):
        bare = statistics.median(bare_loop(args.steps, args.batch, amp, cl) for _ in range(3))
        ours = statistics.median(product_loop(args.steps, args.batch, amp, cl) for _ in range(3))
        rows.append(f"| ResNet-50 224 px, amp={amp}, channels_last={cl} | {ours:.0f} img/s | "
                    f"{bare:.0f} img/s | {ours / bare:.2f} |")
    one, four = trials_per_hour(1, args.epochs), trials_per_hour(4, args.epochs)
    text = "\n".join([
        "### GPU path", "",
        f"`python benchmarks/bench_gpu.py --steps {args.steps} --batch {args.batch}` on {name}, "
        f"{platform.machine()}, torch {torch.__version__}, {date.today().isoformat()}.", "",
        "| | product | bare loop | ratio |", "|---|---|---|---|", *rows, "",
        f"Trials/hour with 1 trial per GPU: {one:.0f}; with 4 (resources.gpu 0.25): {four:.0f}; "
        f"ratio {four / one:.2f}.", ""])
    publish(text, args.out)


if __name__ == "__main__":
    main()
