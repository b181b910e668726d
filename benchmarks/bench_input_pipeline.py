"""Input pipeline at 224 px: what the batched pipeline delivers against the per-item path it
replaced and against a bare numpy gather, side by side in one run.

A CelebA-like folder (Kaggle layout, N JPEGs of 178 x 218) is generated in a temp dir and
decoded once into the decoded cache (224 px: stored squares of 256 x 256), whose pages are
then read once so every figure reads from the page cache. Every row reads the same training
batches (batch 64, the same shuffled order, one epoch of the train split), alternating the
rows round after round (median of the rounds):

(d) the physical anchor: a bare ``np.take`` of each batch's sorted rows from the memory-mapped
    array into a preallocated buffer (what a memory copy from the page cache costs);
(a) uint8 batches delivered by the pipeline to the trial's process: ``InputPipeline.host_batches``
    (sorted gather into a fresh tensor, through the DataLoader), with 0 workers and with the
    workers a GPU trial with ``resources.cpu: 2`` gets (2): what a GPU trial's CPU side costs
    (the crop and normalisation then run on the GPU);
(b) training-ready batches on the CPU: ``InputPipeline.epoch`` on device cpu (batched crop,
    flip, normalisation), with 0 workers and with the 1 worker a CPU trial with
    ``resources.cpu: 2`` gets (the crops then run in the worker);
(c) the per-item path this replaced (the decoded cache's dataset before the batched
    pipeline, reproduced here): per item a PIL ``RandomResizedCrop(224, scale=(0.7, 1))`` +
    ``RandomHorizontalFlip`` of the stored square, then one vectorised normalisation per
    batch; a plain DataLoader over the shuffled order, 0 and 1 worker;
(e) context: the pipeline reading the JPEGs themselves (``cache.decoded: off``; PIL decode,
    resize and crop per image), 0 workers.

Targets (issue 20): (a) >= 0.5 x (d); (b) >= 1.5 x (c), at the same number of workers.

    python benchmarks/bench_input_pipeline.py [--images 2000] [--rounds 3] [--quick]
        [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_common import command, machine, publish, stamp
from bench_data_path import dataset, make_celeba
from PIL import Image

from debias.data import clear_cache
from debias.data import decoded as dec
from debias.data.grouped import GroupedDataset
from debias.data.pipeline import InputPipeline, PipelineDataset, epoch_requests
from debias.data.transforms import normalize_uint8

BATCH = 64
IMAGE_SIZE = 224


class PerItemDecoded(torch.utils.data.Dataset):
    """The decoded cache's training dataset as it was before the batched pipeline (commit
    b49993a, ``DecodedGroupedDataset`` with ``train=True``): PIL crop + flip per item of the
    stored square, then one normalisation of the stacked batch."""

    def __init__(self, data: GroupedDataset, array: np.ndarray) -> None:
        from torchvision import transforms as T

        self.rows = data.view("train").index
        self.array = array
        self.augment = T.Compose([T.RandomResizedCrop(IMAGE_SIZE, scale=(0.7, 1.0)),
                                  T.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        crops = [np.asarray(self.augment(Image.fromarray(self.array[r]))) for r in rows]
        batch = normalize_uint8(np.stack(crops))
        return [(batch[i], int(p)) for i, p in enumerate(positions)]


#: Rows that take milliseconds per epoch run their epoch this many times per measurement, so
#: each timing lasts long enough to be read.
FAST_ROWS, FAST_REPEAT = ("d", "d2", "a0", "a2", "ap"), 5


def timed(run: Callable[[], int], repeat: int = 1) -> float:
    """Images per second of ``repeat`` calls of ``run`` (each returns the images it saw)."""
    start = time.perf_counter()
    n = sum(run() for _ in range(repeat))
    return n / (time.perf_counter() - start)


def rows_of(pipe: InputPipeline, order: np.ndarray) -> Callable[[], int]:
    def run() -> int:
        return sum(len(b) for b in pipe.host_batches(epoch_requests(order, BATCH, 0, 0, True)))
    return run


def ready_of(pipe: InputPipeline, order: np.ndarray) -> Callable[[], int]:
    def run() -> int:
        return sum(len(p) for _, p in pipe.epoch(order, BATCH, 0))
    return run


def measure(root: Path, cache: Path, rounds: int) -> tuple[dict[str, list[float]], dict]:
    data = dataset(root, IMAGE_SIZE)
    n_train = len(data.view("train"))
    order = np.random.default_rng(0).permutation(n_train)
    start = time.perf_counter()
    array, path = dec.decoded_array(data, cache, progress=False)
    info = {"build_s": time.perf_counter() - start, "n_train": n_train, "n_all": len(data),
            "gib": path.stat().st_size / 2**30}
    for start_row in range(0, len(array), 256):  # every page into the page cache
        np.asarray(array[start_row:start_row + 256]).sum()

    requests = epoch_requests(order, BATCH, 0, 0, augment=True)
    size = dec.stored_size(IMAGE_SIZE)
    buffer = np.empty((BATCH, size, size, 3), dtype=np.uint8)

    def bare() -> int:
        for r in requests:
            rows = data.view("train").index[r.positions]
            np.take(array, rows, axis=0, out=buffer[:len(rows)], mode="clip")
        return n_train

    buffers = [np.empty_like(buffer) for _ in range(2)]

    def bare_two_threads() -> int:
        """The 2-CPU limit: two threads gathering alternate batches into their own buffers."""
        def half(k: int) -> None:
            for r in requests[k::2]:
                rows = data.view("train").index[r.positions]
                np.take(array, rows, axis=0, out=buffers[k][:len(rows)], mode="clip")

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(half, (0, 1)))
        return n_train

    def per_item(workers: int) -> Callable[[], int]:
        ds = PerItemDecoded(data, array)

        def run() -> int:
            torch.manual_seed(0)
            loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, sampler=order.tolist(),
                                                 num_workers=workers)
            return sum(len(p) for _, p in loader)
        return run

    def pipe(workers: int, cached: bool = True, **kw: bool) -> InputPipeline:
        return InputPipeline(data, cache_dir=cache if cached else None, augment=True,
                             workers=workers, progress=False, **kw)

    # (a) as a GPU trial's feeders work: gather only, the crops are the device's.
    rows_0, rows_2 = pipe(0, crop_in_feeders=False), pipe(2, crop_in_feeders=False)
    ready_0, ready_1 = pipe(0), pipe(1)
    processes = torch.utils.data.DataLoader(
        PipelineDataset(rows_0.source), batch_sampler=requests, collate_fn=lambda b: b,
        num_workers=2, persistent_workers=True)

    def through_processes() -> int:
        return sum(len(b) for b in processes)

    variants: dict[str, Callable[[], int]] = {
        "d": bare, "d2": bare_two_threads,
        "a0": rows_of(rows_0, order), "a2": rows_of(rows_2, order), "ap": through_processes,
        "b0": ready_of(ready_0, order), "b1": ready_of(ready_1, order),
        "c0": per_item(0), "c1": per_item(1),
        "e0": ready_of(pipe(0, cached=False), order),
    }
    for run in variants.values():  # warm-up: workers started, lazy imports, allocator
        run()
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, run in variants.items():
            results[key].append(timed(run, FAST_REPEAT if key in FAST_ROWS else 1))
    for p in (rows_2, ready_1):
        p.close()
    return results, info


def render(results: dict[str, list[float]], info: dict, args: argparse.Namespace,
           elapsed: float) -> str:
    med = {k: statistics.median(v) for k, v in results.items()}
    d, c0, c1 = med["d"], med["c0"], med["c1"]

    def row(label: str, key: str, base: float | None, base_name: str = "") -> str:
        ratio = f"**{med[key] / base:.2f}** x {base_name}" if base else "1.00"
        spread = ", ".join(f"{v:.0f}" for v in results[key])
        return (f"| {label} | {med[key]:,.0f} | {med[key] / BATCH:,.1f} | {ratio} | "
                f"{spread} |")

    anchor = max(d, med["d2"])  # the fastest bare gather this machine manages
    a_ratio, b_ratio0, b_ratio1 = med["a2"] / anchor, med["b0"] / c0, med["b1"] / c1
    ap_ratio = med["ap"] / anchor
    a_best = min(med["a0"] / anchor, a_ratio)
    verdict_a = "meets" if a_best >= 0.5 else "**misses**"
    verdict_b = "meets" if min(b_ratio0, b_ratio1) >= 1.5 else "**misses**"
    where = machine(f"{torch.get_num_threads()} torch threads in the trial process, CPU only")
    return "\n".join([
        "### Input pipeline at 224 px: batched vs per item vs a bare gather",
        "",
        f"`{command('benchmarks/bench_input_pipeline.py')}`",
        "",
        f"Machine: {where}. Date: {stamp()}. Whole run: {elapsed:.0f} s.",
        f"Generated CelebA-like folder: {info['n_all']:,} JPEGs of 178 x 218, image_size 224, "
        f"stored squares 256 x 256 (decoded array {info['gib']:.2f} GiB, built in "
        f"{info['build_s']:.0f} s, then read once so every row reads from the page cache); "
        f"one epoch of the {info['n_train']:,} training images per row and round, batch "
        f"{BATCH}, the same shuffled order everywhere (rows (d) and (a): {FAST_REPEAT} epochs "
        f"per timing); rows alternate within each of {args.rounds} round(s), median shown.",
        "",
        "| path (train split, 224 px) | images/s | batches/s | ratio | per round |",
        "|---|---|---|---|---|",
        row("(d) bare `np.take` of the sorted rows into a reused buffer, one thread: the "
            "physical anchor", "d", None),
        row("(d) the same on two threads (alternate batches)", "d2", d, "(d), one thread"),
        row("(a) pipeline: uint8 squares delivered to the trial's thread, no feeder (gathered "
            "in that thread)", "a0", anchor, "the faster (d)"),
        row("(a) pipeline: uint8 squares delivered, 2 feeder threads (a GPU trial with "
            "cpu: 2)", "a2", anchor, "the faster (d)"),
        row("(a') the same batches through 2 DataLoader worker processes (not used for the "
            "decoded cache: why)", "ap", anchor, "the faster (d)"),
        row("(c) per-item path it replaced: PIL crop + flip per item, DataLoader, 0 workers",
            "c0", None),
        row("(b) pipeline: training-ready batches (batched crop, flip, normalise) on the "
            "CPU, 0 workers", "b0", c0, "(c)"),
        row("(c) per-item path, 1 DataLoader worker process", "c1", None),
        row("(b) pipeline: training-ready on the CPU, 1 feeder thread (a CPU trial with "
            "cpu: 2; crops in the feeder)", "b1", c1, "(c), 1 worker"),
        row("(e) context: pipeline reading the JPEGs (`cache.decoded: off`), 0 workers",
            "e0", c0, "(c)"),
        "",
        f"- (a) >= 0.5 x (d), against the faster of the two bare gathers: "
        f"{med['a0'] / anchor:.2f} in the trial's thread, {a_ratio:.2f} with 2 feeder "
        f"threads: {verdict_a}. (b) >= 1.5 x (c) at the same number of workers: {b_ratio0:.2f} "
        f"(none), {b_ratio1:.2f} (one): {verdict_b}.",
        f"- A GPU trial's CPU side is row (a): {med['a2']:,.0f} uint8 images/s with 2 "
        "feeders, against the few thousand images/s a ResNet trains at on a data-centre GPU; "
        "the crop and normalisation of those images run on the GPU (not measured here: no "
        "GPU on this machine; `benchmarks/bench_gpu.py` measures the whole trial there).",
        f"- Why threads feed the decoded cache: the same batches through DataLoader worker "
        f"processes reach {ap_ratio:.2f} x (d): each 12 MB batch is written into fresh shared "
        "memory and handed over, which costs several times the gather. Between threads (a) "
        "pays only a fresh buffer per batch (numpy's allocator reuses the freed block, so no "
        "page is faulted in again) and the hand-over; on a GPU trial the buffer is "
        "page-locked instead (torch's caching host allocator; no CUDA here, so no pinning in "
        "these rows).",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="400 images, one round")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.images, args.rounds = 400, 1
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="debias_pipeline_") as tmp:
        root = make_celeba(Path(tmp) / "celeba", args.images)
        clear_cache()
        results, info = measure(root, Path(tmp) / "cache", args.rounds)
    publish(render(results, info, args, time.perf_counter() - start), args.out)


if __name__ == "__main__":
    main()
