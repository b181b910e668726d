"""What a sweep will cost, before it runs: its work (trials, epochs, training images seen,
shared-stage computations) and an estimated wall clock on the slots it will have (the disk
its decoded images need: :mod:`debias.cache_space`).

The wall clock comes from one training step of the sweep's model at its image size, timed
on this machine's device (a GPU where the sweep's trials get one and this machine has one,
else the CPU with the threads a trial gets), or from a rate the user gives for the device
the sweep will really run on (``--images-per-s``). From it:

- a trial's time: epochs x (training images / rate + evaluated images / (rate x
  :data:`EVAL_SPEEDUP`)) + :data:`TRIAL_OVERHEAD_S`; a last-layer trial (a grid of logistic
  regressions on cached features) only its overhead;
- a stage's time (planned once per key, as the sweep does): the reference model trains like a
  trial; features are forward passes; GradCAM costs a training step per image; JTT's error
  set trains its identification model where it has its own;
- the wall clock: the larger of (all work / slots) and the longest pipeline's chain (its
  search stages, its search trials in waves of at most ``search.max_concurrent``, then its
  seeds' stages and trials), plus :data:`SWEEP_OVERHEAD_S`.

What it leaves out, and says: the input pipeline is assumed to keep up (a starved trial
shows ``perf/data_wait_frac`` > 1/3), an epoch visits the training split once (a method's
sampler may visit more or fewer), test is evaluated every epoch (only when the selection
improves, in fact: an upper bound), and ASHA's early stops are not predicted (an upper
bound again). BENCHMARKS.md, "Estimate vs measured", compares it with measured sweeps.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from debias.data import GroupedDataset
from debias.spec import Spec, with_params
from debias.trial_config import TrialConfig

__all__ = ["EVAL_SPEEDUP", "SWEEP_OVERHEAD_S", "TRIAL_OVERHEAD_S", "Estimate", "Rates",
           "estimate", "estimate_line", "local_slots", "time_step"]

#: A forward pass per image against a training step (forward, backward, optimiser step).
EVAL_SPEEDUP = 3.0
#: Per trial or stage task: the worker taking it (importing the trainable: 1.4 s,
#: BENCHMARKS.md "Start-up"), building the model and data, a checkpoint per epoch, its run.
TRIAL_OVERHEAD_S = 3.0
#: Per sweep: a local Ray starting, Tune starting its first trials, the report and Ray's
#: shutdown at the end (BENCHMARKS.md "Sweep efficiency": about 8 s around the trials' span
#: with Ray up, and Ray's own start before that).
SWEEP_OVERHEAD_S = 15.0


@dataclass(frozen=True)
class Rates:
    """Images per second of one trial: training steps and evaluation (forward) passes."""

    train: float
    eval: float
    where: str  # how they were obtained, for the line


@dataclass
class Estimate:
    search: int = 0
    seeds: int = 0
    stages: int = 0
    epochs: float = 0.0
    train_images: float = 0.0
    work_s: float = 0.0
    chain_s: float = 0.0
    slots: int = 1
    stage_names: dict[str, int] = field(default_factory=dict)

    @property
    def trials(self) -> int:
        return self.search + self.seeds

    @property
    def wall_s(self) -> float:
        return max(self.work_s / max(self.slots, 1), self.chain_s) + SWEEP_OVERHEAD_S


# --------------------------------------------------------------------------- rates


def _device(spec: Spec) -> Any:
    import torch

    gpu = spec.resources.gpu
    return torch.device("cuda" if gpu > 0 and torch.cuda.is_available() else "cpu")


def time_step(spec: Spec, min_seconds: float = 0.5, batch: int | None = None) -> Rates:
    """Time the sweep's model at its image size on this machine's device: one warm-up step,
    then training steps (and forward passes) until ``min_seconds`` have passed (at most 3).
    On the CPU, with the threads one trial gets (``resources.cpu``)."""
    import torch
    import torch.nn.functional as F

    from debias.models import build_classifier

    device = _device(spec)
    size = int(spec.dataset.image_size or 32)
    arch = spec.backbone.arch
    # Small batches keep the timing short for big models on a CPU; per image it is close.
    n = batch or max(2, min(spec.train.batch_size,
                            32 if size <= 64 else 8))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.resources.cpu)))
    try:
        model = build_classifier(arch, "none", {"target": 2}).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(n, 3, size, size, device=device)
        y = torch.randint(0, 2, (n,), device=device)

        def train() -> None:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def forward() -> None:
            model(x)

        rates = []
        for step, mode in ((train, model.train), (forward, model.eval)):
            mode()
            step()  # warm-up: allocator, cuDNN's choice of kernels, lazy initialisation
            steps, start = 0, time.perf_counter()
            while steps < 3 and (steps == 0 or time.perf_counter() - start < min_seconds):
                step()
                steps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(n * steps / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    where = (f"a training step of {arch} at {size} px timed here on {device.type}"
             + (f" with {max(1, int(spec.resources.cpu))} thread(s)"
                if device.type == "cpu" else ""))
    return Rates(train=rates[0], eval=rates[1], where=where)


def given_rate(images_per_s: float) -> Rates:
    return Rates(train=images_per_s, eval=images_per_s * EVAL_SPEEDUP,
                 where=f"the given rate of {images_per_s:,.0f} training images/s per trial")


def local_slots(spec: Spec, num_cpus: int | None = None) -> int:
    """Trials a local Ray on this machine runs at once (what ``launch.py`` without
    ``--address`` gets)."""
    cpus = num_cpus or os.cpu_count() or 1
    slots = int(cpus // spec.resources.cpu)
    gpu = spec.resources.gpu
    if gpu > 0:
        import torch

        slots = min(slots, int(torch.cuda.device_count() / gpu))
    cap = spec.search.max_concurrent_total
    return max(1, min(slots, cap) if cap else slots)


# --------------------------------------------------------------------------- the work


def _mean_epochs(spec: Spec, method: str) -> float:
    for d in spec.space_for(method):
        if d.path == "train.epochs":
            return (sum(d.values) / len(d.values) if d.kind == "choice"
                    else (float(d.low) + float(d.high)) / 2)
    return float(spec.train.epochs)


def _sizes(data: GroupedDataset) -> dict[str, int]:
    return {s: len(data.view(s)) for s in ("train", "val", "test")}


def _stage_seconds(request: Any, n: dict[str, int], rates: Rates) -> tuple[float, float]:
    """(seconds, training images) of one stage computation, from the work its requester
    declared (:attr:`StageRequest.work`; none declared: one evaluation pass over every split).
    A ``train`` or ``backward`` pass costs a training step per image; training images count
    the ``train`` passes only (a reference or identification model's epochs)."""
    work = request.work or tuple(("eval", s, 1.0) for s in n)
    seconds = trained = 0.0
    for kind, split, passes in work:
        seconds += passes * n[split] / (rates.eval if kind == "eval" else rates.train)
        if kind == "train":
            trained += passes * n[split]
    return seconds, trained


def estimate(spec: Spec, rates: Rates, slots: int) -> Estimate:
    """The sweep's work and its wall clock on ``slots`` trials at once."""
    from debias.sweep import num_search_trials, pipelines

    out = Estimate(slots=slots)
    seen: set[str] = set()
    for pipe in pipelines(spec):
        cls = spec.method_class(pipe.method)
        data = spec.load_data(pipe.target)
        n = _sizes(data)
        epochs = _mean_epochs(spec, pipe.method)
        kinds = {cls.trial_kind(p) for p in spec.param_variants(pipe.method)}
        if kinds == {"last_layer"}:
            epochs = 0.0
        trial_s = epochs * (n["train"] / rates.train
                            + (n["val"] + n["test"]) / rates.eval) + TRIAL_OVERHEAD_S
        n_search, n_seeds = num_search_trials(spec, pipe.method), len(spec.seeds)
        out.search += n_search
        out.seeds += n_seeds
        out.epochs += epochs * (n_search + n_seeds)
        out.train_images += epochs * n["train"] * (n_search + n_seeds)
        out.work_s += trial_s * (n_search + n_seeds)
        base = spec.trial_base(pipe.target, pipe.method)
        chain = 0.0
        parallel = min(slots, spec.search.max_concurrent or slots)
        for phase, seeds, count in (("search", [spec.search_seed], n_search),
                                    ("seeds", spec.seeds, n_seeds)):
            stage_s = 0.0
            for seed in seeds:
                config = TrialConfig.of(with_params(base, {"seed": seed}))
                seed_s = 0.0
                for request in cls.shared_stages(config, data):
                    seconds, images = _stage_seconds(request, n, rates)
                    seed_s += seconds + TRIAL_OVERHEAD_S
                    if request.key in seen:
                        continue
                    seen.add(request.key)
                    out.stages += 1
                    out.stage_names[request.stage] = out.stage_names.get(request.stage, 0) + 1
                    out.train_images += images
                    out.work_s += seconds + TRIAL_OVERHEAD_S
                stage_s = max(stage_s, seed_s)  # the seeds' stages run side by side
            waves = math.ceil(count / max(parallel, 1)) if phase == "search" else math.ceil(
                count / max(slots, 1))
            chain += stage_s + waves * trial_s
        out.chain_s = max(out.chain_s, chain)
    return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(spec: Spec, images_per_s: float | None = None,
                  num_cpus: int | None = None) -> str:
    """The one ``estimate:`` line of ``--dry-run`` (the seconds as ``(N s)``), on the slots
    a local Ray of this machine (or of ``num_cpus`` CPUs) gives the sweep."""
    rates = given_rate(images_per_s) if images_per_s is not None else time_step(spec)
    slots = local_slots(spec, num_cpus)
    est = estimate(spec, rates, slots)
    stages = ", ".join(f"{k} {v}" for k, v in sorted(est.stage_names.items()))
    cpus = num_cpus or os.cpu_count() or 1
    return (f"estimate: {est.trials} trials ({est.search} search + {est.seeds} seeds), "
            f"{est.epochs:,.0f} epochs, {est.train_images:,.0f} training images seen, "
            f"{est.stages} stage computations{f' ({stages})' if stages else ''}; about "
            f"{_duration(est.wall_s)} ({est.wall_s:.0f} s) on {slots} slot(s) ({cpus} CPUs "
            f"here, {spec.resources.cpu:g} per trial), from {rates.where} "
            f"({rates.train:,.0f} training, {rates.eval:,.0f} evaluated images/s per trial)")
