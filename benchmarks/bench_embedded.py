"""Does the embedded dataset behave like Waterbirds? Tuned ERM vs the oracle GroupDRO, per data
seed and spurious correlation, with the product's own training code.

The two properties (issue 13, item 5), on the group-balanced test split:

1. ERM learns the core feature: tuned ERM's test average accuracy >= 80%;
2. yet keeps a large worst-group gap: the oracle GroupDRO's test worst-group accuracy (WGA)
   is >= 15 points above tuned ERM's.

Both methods get the same budget and the same small grid: small_cnn from scratch, SGD
(momentum 0.9, weight decay 1e-4), batch 64, a cosine schedule over ``--epochs`` epochs, each
lr of ``--lrs``; the trial's test metrics come from the epoch of best validation WGA (the
engine's selection), and the lr is the one whose run reached the best validation WGA. So
"tuned" covers lr and (by that selection) the number of epochs. GroupDRO is the product's
``method: groupdro`` (eta 0.01, no group adjustment) where the registry has it; otherwise a
stand-in built here: ERM on the training split with every group upsampled to the largest
(an oracle of the same kind, reading the training bias labels), with its epochs scaled so it
sees as many samples.

Also measured: how fast each cue is learned when it is not correlated with the other
(spurious_correlation 0.5: ERM on Background, ERM on the digit), the generation time, and
small_cnn's time per epoch on the training split at 32 and 16 px (the quickstart's budget).

    python benchmarks/bench_embedded.py [--settings 0.95:0,0.95:1,0.95:2,0.9:0,0.99:0]
        [--target Odd] [--epochs 20] [--lrs 0.05,0.1] [--threads 1] [--no-long]
        [--quick] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import command, machine, publish, stamp

from debias.data import load_grouped, synthetic
from debias.spec import validate, with_params
from debias.trainable import build_trial

AVG_TARGET = 0.80
GAP_TARGET = 0.15
GROUPDRO = {"eta": 0.01, "adjustment": 0.0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def has_groupdro() -> bool:
    """Whether the method registry offers `groupdro` (either registry API)."""
    try:
        from debias.methods import resolve_method

        resolve_method("groupdro")
        return True
    except Exception:  # an older registry, or no such method
        pass
    try:
        from debias.methods import METHODS

        return "groupdro" in METHODS
    except ImportError:
        return False


def trial_config(storage: str, method: str, target: str, bias: str, dataset: dict[str, Any],
                 train: dict[str, Any], **sections: Any) -> dict[str, Any]:
    spec = validate({
        "name": "bench_embedded", "method": method, "targets": [target],
        "bias_attribute": bias, "dataset": {"name": "synthetic", **dataset},
        "backbone": {"arch": "small_cnn", "weights": "none"},
        "train": {"batch_size": 64, "optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-4,
                  "momentum": 0.9, "scheduler": "cosine", **train},
        "search": {"metric": "val/worst_group_acc", "mode": "max"},
        **sections, "storage": storage})
    return with_params(spec.trial_base(target), {"seed": 0})


def upsampled(config: dict[str, Any]) -> Any:
    """The training split with every group repeated up to the largest group's size (the
    remainder drawn at random, fixed seed); val and test unchanged."""
    from debias.data.grouped import GroupedDataset

    d = load_grouped(config["dataset"], config["target"], config["bias"])
    rng = np.random.default_rng(0)
    train = np.flatnonzero(d.split == 0)
    group = d.y[train] * 2 + d.a[train]
    largest = int(np.bincount(group, minlength=4).max())
    parts = [np.flatnonzero(d.split != 0)]
    for g in range(4):
        idx = train[group == g]
        parts.append(np.concatenate([np.tile(idx, largest // len(idx)),
                                     rng.choice(idx, largest % len(idx), replace=False)]))
    ix = np.concatenate(parts)
    return GroupedDataset(
        name=d.name, target=d.target, bias=d.bias, ids=d.ids[ix], split=d.split[ix],
        y=d.y[ix], a=d.a[ix], image_size=d.image_size, images=d.images[ix],
        image_paths=None, masks=d.masks[ix], source=d.source + "+upsampled")


def stand_in_trial(config: dict[str, Any]) -> Any:
    """ERM's trainer on the upsampled split (either engine API)."""
    from debias.engine import Trainer

    data = upsampled(config)
    try:  # the registry-era engine is handed the method class
        from debias.methods import resolve_method

        return Trainer(config, resolve_method("erm"), device="cpu", data=data)
    except ImportError:
        return Trainer(config, device="cpu", data=data)


def run(method: str, sc: float, data_seed: int, lr: float, epochs: int, size: int,
        target: str, bias: str) -> dict[str, float]:
    """One trial to the end; its final report (the selected epoch's test metrics)."""
    dataset = {"image_size": size, "spurious_correlation": sc, "seed": data_seed}
    with tempfile.TemporaryDirectory() as storage:
        if method == "groupdro":
            config = trial_config(storage, "groupdro", target, bias, dataset,
                                  {"epochs": epochs, "lr": lr}, groupdro=GROUPDRO)
            trial = build_trial(config, device="cpu")
        elif method == "upsampled":
            base = load_grouped({"name": "synthetic", **dataset}, target, bias)
            n_up = 4 * int(base.group_counts("train").max())
            scaled = max(1, round(epochs * len(base.view("train")) / n_up))
            config = trial_config(storage, "erm", target, bias, dataset,
                                  {"epochs": scaled, "lr": lr})
            trial = stand_in_trial(config)
        else:
            config = trial_config(storage, "erm", target, bias, dataset,
                                  {"epochs": epochs, "lr": lr})
            trial = build_trial(config, device="cpu")
        start = time.perf_counter()
        for metrics in trial.epochs():
            last = metrics
        last = dict(last)
        last["wall_s"] = time.perf_counter() - start
        return last


def cue_speed(size: int, epochs: int) -> list[tuple[str, list[float]]]:
    """Validation accuracy per epoch of ERM learning each cue alone (correlation 0.5)."""
    rows = []
    for target, bias in (("Background", "Odd"), ("Odd", "Background")):
        with tempfile.TemporaryDirectory() as storage:
            config = trial_config(storage, "erm", target, bias,
                                  {"image_size": size, "spurious_correlation": 0.5, "seed": 0},
                                  {"epochs": epochs, "lr": 0.05})
            trial = build_trial(config, device="cpu")
            rows.append((target, [m["val/avg_acc"] for m in trial.epochs()]))
    return rows


def epoch_time(size: int, epochs: int) -> tuple[int, float, float]:
    """(training images, median s per epoch of training, median s of its evaluation)."""
    with tempfile.TemporaryDirectory() as storage:
        config = trial_config(storage, "erm", "Odd", "Background", {"image_size": size},
                              {"epochs": epochs + 1, "lr": 0.05})
        trial = build_trial(config, device="cpu")
        spent = {"eval": 0.0}
        evaluate = trial.evaluate

        def timed(split: str) -> dict[str, float]:
            start = time.perf_counter()
            try:
                return evaluate(split)
            finally:
                spent["eval"] += time.perf_counter() - start

        trial.evaluate = timed  # type: ignore[method-assign]
        trial.train_one_epoch()  # warm-up
        train_s, eval_s = [], []
        for _ in range(epochs):
            spent["eval"] = 0.0
            start = time.perf_counter()
            trial.train_one_epoch()
            total = time.perf_counter() - start
            train_s.append(total - spent["eval"])
            eval_s.append(spent["eval"])
        return len(trial.train_set), statistics.median(train_s), statistics.median(eval_s)


def generation_time() -> list[tuple[str, float]]:
    """Seconds to generate the dataset (first call: digits and photos read too)."""
    for fn in (synthetic._digits, synthetic._photos, synthetic._texture_pool,
               synthetic._resized_digits):
        fn.cache_clear()
    out = []
    for label, cfg in (("32 px, first in the process", {"image_size": 32, "seed": 11}),
                       ("32 px, another seed", {"image_size": 32, "seed": 12}),
                       ("16 px, first at this size", {"image_size": 16, "seed": 11})):
        start = time.perf_counter()
        synthetic.load(cfg, "Odd", "Background")
        out.append((label, time.perf_counter() - start))
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent)
        return rev + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="0.95:0,0.95:1,0.95:2,0.9:0,0.99:0",
                   help="comma-separated correlation:data_seed pairs")
    p.add_argument("--target", default="Odd", choices=synthetic.DIGIT_ATTRIBUTES)
    p.add_argument("--epochs", type=int, default=20, help="the budget, for every method")
    p.add_argument("--lrs", default="0.05,0.1", help="the lr grid, for every method")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--oracle", choices=("auto", "groupdro", "upsampled"), default="auto",
                   help="auto: groupdro where the registry has it, else the stand-in")
    p.add_argument("--no-long", action="store_true",
                   help="skip ERM at twice the budget on the first setting")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one setting, 2 epochs, one lr, 16 px")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file")
    args = p.parse_args()
    if args.quick:
        args.settings, args.epochs, args.lrs, args.size, args.no_long = (
            "0.95:0", 2, "0.05", 16, True)
    torch.set_num_threads(args.threads)
    settings = [(float(s.split(":")[0]), int(s.split(":")[1])) for s in args.settings.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    oracle = args.oracle if args.oracle != "auto" else (
        "groupdro" if has_groupdro() else "upsampled")
    oracle_name = "GroupDRO" if oracle == "groupdro" else "upsampled ERM (GroupDRO stand-in)"
    target, bias = args.target, "Background"
    started = time.perf_counter()

    log("generation time ...")
    gen = generation_time()
    log("epoch time ...")
    n_timed = 1 if args.quick else 3
    times = {size: epoch_time(size, n_timed) for size in (32, 16)}
    log("cue speed ...")
    cues = cue_speed(args.size, 1 if args.quick else 3)

    results: dict[tuple[float, int], dict[str, list[tuple[float, dict[str, float]]]]] = {}
    n_runs = len(settings) * 2 * len(lrs)
    done = 0
    for sc, ds in settings:
        results[(sc, ds)] = {}
        for method in ("erm", oracle):
            runs = []
            for lr in lrs:
                m = run(method, sc, ds, lr, args.epochs, args.size, target, bias)
                runs.append((lr, m))
                done += 1
                log(f"[{done}/{n_runs}] sc={sc} data seed {ds} {method} lr={lr}: val WGA "
                    f"{pct(m['selected/score'])} @ epoch {m['selected/epoch']:.0f}, test WGA "
                    f"{pct(m['test/worst_group_acc'])}, test avg {pct(m['test/avg_acc'])}, "
                    f"{m['wall_s']:.0f} s, {(time.perf_counter() - started) / 60:.1f} min in all")
            results[(sc, ds)][method] = runs

    def tuned(runs: list[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
        return max(runs, key=lambda r: r[1]["selected/score"])  # first best on ties

    long_row = None
    if not args.no_long:
        sc, ds = settings[0]
        lr, _ = tuned(results[(sc, ds)]["erm"])
        log(f"ERM at twice the budget ({2 * args.epochs} epochs), sc={sc} data seed {ds} ...")
        long_row = (sc, ds, lr, run("erm", sc, ds, lr, 2 * args.epochs, args.size, target, bias))

    total_min = (time.perf_counter() - started) / 60
    n_train = times[32][0]
    lines = [
        "### Embedded dataset: does it behave like Waterbirds?",
        "",
        f"`{command('benchmarks/bench_embedded.py')}`",
        "",
        f"Machine: {machine(f'{args.threads} torch thread(s), CPU only')}. Date: {stamp()}. "
        f"Code: commit {commit()}. Dataset generator v{synthetic.GENERATOR_VERSION} "
        f"({synthetic.GENERATOR}). Whole run: {total_min:.0f} min.",
        "",
        f"Target `{target}`, bias `{bias}`, {args.size} px, small_cnn from scratch; "
        f"{n_train:,} training images, 1,000 validation and 1,000 test images (both "
        "group-balanced). Every method: SGD (momentum 0.9, weight decay 1e-4), batch 64, cosine "
        f"schedule over {args.epochs} epochs, lr in {{{', '.join(map(str, lrs))}}}; test "
        "metrics of the epoch with the best validation WGA, and of the lr whose run reached "
        f"the best validation WGA (\"tuned\"). Oracle: {oracle_name}"
        + (f" (eta {GROUPDRO['eta']}, adjustment {GROUPDRO['adjustment']})"
           if oracle == "groupdro" else "") + ". Training seed 0 throughout; the data seed "
        "draws another split, other background crops and other digit positions.",
        "",
        f"| correlation | data seed | ERM: lr, test avg acc | ERM: test WGA | {oracle_name}: "
        f"lr, test WGA | gap (points) | ERM avg >= {AVG_TARGET:.0%} | gap >= "
        f"{100 * GAP_TARGET:.0f} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (sc, ds), by_method in results.items():
        e_lr, e = tuned(by_method["erm"])
        o_lr, o = tuned(by_method[oracle])
        gap = o["test/worst_group_acc"] - e["test/worst_group_acc"]
        ok_avg = "yes" if e["test/avg_acc"] >= AVG_TARGET else "**no**"
        ok_gap = "yes" if gap >= GAP_TARGET else "**no**"
        lines.append(f"| {sc} | {ds} | {e_lr}, {pct(e['test/avg_acc'])} | "
                     f"{pct(e['test/worst_group_acc'])} | {o_lr}, "
                     f"{pct(o['test/worst_group_acc'])} | {100 * gap:+.1f} | {ok_avg} | "
                     f"{ok_gap} |")
    by_sc: dict[float, list[tuple[float, float, float]]] = {}
    for (sc, _), by_method in results.items():
        e = tuned(by_method["erm"])[1]
        o = tuned(by_method[oracle])[1]
        by_sc.setdefault(sc, []).append((e["test/avg_acc"], e["test/worst_group_acc"],
                                         o["test/worst_group_acc"]))
    lines += ["", "Mean ± std over data seeds, where a correlation has more than one:", "",
              f"| correlation | seeds | ERM test avg acc | ERM test WGA | {oracle_name} test "
              "WGA |", "|---|---|---|---|---|"]
    for sc, vals in by_sc.items():
        if len(vals) < 2:
            continue
        cols = [[v[k] for v in vals] for k in range(3)]
        lines.append(f"| {sc} | {len(vals)} | " + " | ".join(
            f"{pct(statistics.mean(c))} ± {pct(statistics.stdev(c))}" for c in cols) + " |")
    lines += ["", "Every run (val WGA = the selection score; groups are test accuracies of "
              "(y, Background) = (0,0), (0,1), (1,0), (1,1); the minority groups are (0,1) and "
              "(1,0)):", "",
              "| correlation | data seed | method | lr | epochs | val WGA @ epoch | test WGA | "
              "test avg | test groups | final train loss | s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]

    def detail(sc: float, ds: int, method: str, lr: float, m: dict[str, float]) -> str:
        groups = ", ".join(pct(m.get(f"test/group_acc/{y}_{a}", float("nan")))
                           for y in (0, 1) for a in (0, 1))
        return (f"| {sc} | {ds} | {method} | {lr} | {m['epoch']:.0f} | "
                f"{pct(m['selected/score'])} @ {m['selected/epoch']:.0f} | "
                f"{pct(m['test/worst_group_acc'])} | {pct(m['test/avg_acc'])} | {groups} | "
                f"{m['train/loss']:.3f} | {m['wall_s']:.0f} |")

    for (sc, ds), by_method in results.items():
        for method, runs in by_method.items():
            for lr, m in runs:
                lines.append(detail(sc, ds, method, lr, m))
    if long_row is not None:
        sc, ds, lr, m = long_row
        lines.append(detail(sc, ds, "erm, 2x budget", lr, m))
        lines += ["", f"ERM at twice the budget ({2 * args.epochs} epochs, the tuned lr {lr} of "
                  f"correlation {sc}, data seed {ds}; last row above): test WGA "
                  f"{pct(m['test/worst_group_acc'])}, test avg {pct(m['test/avg_acc'])}."]
    lines += ["", "How fast each cue is learned on its own (correlation 0.5, so the other "
              f"carries no information; ERM, lr 0.05, {args.size} px): validation accuracy "
              "after each epoch.", "", "| ERM target | val accuracy per epoch |", "|---|---|"]
    for tgt, accs in cues:
        lines.append(f"| `{tgt}` | {', '.join(pct(a) for a in accs)} |")
    lines += ["", "Generation (5,000 images; `debias.data` caches a dataset per process):", "",
              "| call | s |", "|---|---|"]
    lines += [f"| {label} | {s:.2f} |" for label, s in gen]
    lines += ["", "small_cnn, ERM, batch 64, one torch thread, on the training split "
              f"(median of {n_timed} epoch(s) after a warm-up):", "",
              "| image size | training images | training s / epoch | evaluation (val, and test "
              "when the selection improves) s / epoch |", "|---|---|---|---|"]
    for size, (n, tr, ev) in times.items():
        lines.append(f"| {size} px | {n:,} | {tr:.2f} | {ev:.2f} |")
    lines.append("")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
