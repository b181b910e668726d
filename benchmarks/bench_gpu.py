"""GPU path: images/s of a real trial on the real-data path (Waterbirds-layout JPEGs, the
decoded cache, the batched input pipeline) vs a bare PyTorch loop on a GPU-resident batch
(ResNet-50, 224 px, bf16 autocast + channels_last), the trial's perf/data_wait_frac, and
trials/hour with 1 vs 4 trials per GPU. Targets (issue 20): ratio >= 0.9, data wait <= 0.05.

Needs a CUDA GPU; on a machine without one it says so and exits 0 (BENCHMARKS.md records
that the figures were not measured there).

    python benchmarks/bench_gpu.py [--steps 50] [--batch 128] [--images 4000] [--cpus 4]
        [--out BENCHMARKS.md]
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


def product_loop(steps: int, batch: int, amp: bool, channels_last: bool, root: Path,
                 cpus: int) -> tuple[float, float]:
    """(images/s, data-wait share) of a real trial's training epoch (debias.engine.Trainer,
    ERM, ResNet-50 at 224 px) on the real-data path: JPEGs in the Waterbirds layout, the
    decoded cache, the batched pipeline (feeders gathering uint8 into pinned memory, crops
    and normalisation on the GPU), with the workers ``resources.cpu: cpus`` gives a trial.
    The second epoch is measured (the first builds the cache and warms cuDNN up)."""
    from debias.engine import Trainer
    from debias.spec import validate, with_params
    from debias.trainable import build_trial

    del steps
    torch.set_num_threads(cpus)  # what the trainable does with the trial's CPUs
    with tempfile.TemporaryDirectory(prefix="debias_gpu_trial_") as tmp:
        spec = validate({
            "name": "gpu", "method": "erm", "targets": ["Object"], "bias_attribute": "Place",
            "dataset": {"name": "waterbirds", "root": str(root), "image_size": 224},
            "backbone": {"arch": "resnet50", "weights": "none"},
            "train": {"epochs": 2, "batch_size": batch, "amp": amp,
                      "channels_last": channels_last, "augment": "on"},
            "resources": {"cpu": cpus, "gpu": 1}, "storage": tmp})
        trainer = build_trial(with_params(spec.trial_base("Object"), {}), device="cuda")
        assert isinstance(trainer, Trainer), "ERM trains by SGD epochs: the engine's Trainer"
        trainer.train_one_epoch()
        metrics = trainer.train_one_epoch()
        trainer.pipeline.close()
    return metrics["perf/train_images_per_s"], metrics["perf/data_wait_frac"]


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
    p.add_argument("--images", type=int, default=4000,
                   help="Waterbirds-layout images written for the trial (train: 60%%)")
    p.add_argument("--cpus", type=int, default=4, help="resources.cpu of the trial")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine; nothing measured.")
        return
    from debias.data.export_layouts import write_dataset

    name = torch.cuda.get_device_name()
    rows = []
    with tempfile.TemporaryDirectory(prefix="debias_gpu_data_") as tmp:
        root = write_dataset("waterbirds", tmp, images=args.images)
        for amp, cl in ((False, False), (True, True)):
            bare = statistics.median(bare_loop(args.steps, args.batch, amp, cl)
                                     for _ in range(3))
            runs = [product_loop(args.steps, args.batch, amp, cl, root, args.cpus)
                    for _ in range(3)]
            ours = statistics.median(r[0] for r in runs)
            wait = statistics.median(r[1] for r in runs)
            rows.append(f"| ResNet-50 224 px, amp={amp}, channels_last={cl} | {ours:.0f} img/s "
                        f"| {bare:.0f} img/s | **{ours / bare:.2f}** (target >= 0.9) | "
                        f"{wait:.3f} (target <= 0.05) |")
    one, four = trials_per_hour(1, args.epochs), trials_per_hour(4, args.epochs)
    text = "\n".join([
        "### GPU path", "",
        f"`python benchmarks/bench_gpu.py --steps {args.steps} --batch {args.batch} --images "
        f"{args.images} --cpus {args.cpus}` on {name}, {platform.machine()}, torch "
        f"{torch.__version__}, {date.today().isoformat()}.", "",
        "Product: a real trial's training epoch (ERM, `debias.engine.Trainer`) on the real-data "
        "path (Waterbirds-layout JPEGs written by `--write-dataset`, the decoded cache, the "
        f"batched pipeline; `resources.cpu: {args.cpus}`, so {args.cpus} feeder threads), its "
        "second epoch; bare loop: the same model stepping on one GPU-resident batch.", "",
        "| | product (real data path) | bare loop (GPU-resident batch) | ratio | "
        "perf/data_wait_frac |", "|---|---|---|---|---|", *rows, "",
        f"Trials/hour with 1 trial per GPU: {one:.0f}; with 4 (resources.gpu 0.25): {four:.0f}; "
        f"ratio {four / one:.2f}.", ""])
    publish(text, args.out)


if __name__ == "__main__":
    main()
