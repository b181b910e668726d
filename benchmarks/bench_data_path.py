"""On-disk data path: PIL decoding every epoch vs the shared decoded memmap, in one run.

A CelebA-like folder (Kaggle layout, N JPEGs of 178 x 218 with CelebA's 80/10/10 splits) is
generated in a temp dir, then:

1. Throughput (images/s of a DataLoader over the train split, batch 64, shuffled, augmented,
   num_workers 0, as a trial reads it) for two epochs of each path:
   ``make_torch_dataset(data, "train", True)`` (PIL decode + resize per item, per epoch) and
   ``make_torch_dataset(data, "train", True, cache_dir=...)`` (the first call decodes every
   image of every split once into the memmap: that build is reported on its own and is
   included in the memmap path's first-epoch figure). Plus one evaluation pass (all splits,
   centre crop) of each path.
2. Memory per trial with 1, 2 and 4 trial processes on this node (spawned with
   multiprocessing), each reading every image once: either through the shared memmap, or
   from its own decoded in-memory copy (what each trial would hold without the shared file).
   PSS (proportional set size: shared pages divided among the processes that map them) and
   USS (private pages) come from /proc/<pid>/smaps_rollup while all workers are alive; the
   data's share is each figure minus that of an idle worker (same imports, no images) at the
   same process count.

    python benchmarks/bench_data_path.py [--images 2000] [--image-size 64]
        [--procs 1 2 4] [--quick] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import csv
import gc
import mmap
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import command, machine, publish, stamp
from PIL import Image, ImageDraw, ImageFilter

from debias.data import clear_cache, load_grouped, make_torch_dataset
from debias.data import decoded as dec
from debias.data.celeba import ATTRIBUTES

TARGET, BIAS = "Blond_Hair", "Male"


def make_celeba(root: Path, n: int, seed: int = 0) -> Path:
    """Kaggle layout with n synthetic 'portraits': smooth background, a few blurred blobs,
    sensor-like noise, saved as JPEG quality 90 (about the size and decode cost of CelebA's)."""
    rng = np.random.default_rng(seed)
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    ids = [f"{i + 1:06d}.jpg" for i in range(n)]
    split = np.where(np.arange(n) % 10 < 8, 0, np.where(np.arange(n) % 10 == 8, 1, 2))
    with (root / "list_attr_celeba.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", *ATTRIBUTES])
        for image_id in ids:
            w.writerow([image_id, *(rng.choice([-1, 1]) for _ in ATTRIBUTES)])
    with (root / "list_eval_partition.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "partition"])
        w.writerows(zip(ids, split.tolist(), strict=True))
    yy, xx = np.mgrid[0:218, 0:178].astype(np.float32)
    for image_id in ids:
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = ((xx / 178 + yy / 218) / 2)[..., None]
        img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, 150), rng.integers(0, 190)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 90), y0 + rng.integers(20, 110)],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(2)), dtype=np.int16)
        arr = arr + rng.integers(-8, 9, arr.shape)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / image_id, quality=90)
    return root


def dataset(root: Path, image_size: int):
    return load_grouped({"name": "celeba", "root": str(root), "image_size": image_size},
                        TARGET, BIAS)


def epoch_seconds(ds: torch.utils.data.Dataset, seed: int, shuffle: bool = True,
                  batch: int = 64) -> float:
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle,
                                         generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def throughput(root: Path, image_size: int, cache: Path) -> dict[str, Any]:
    data = dataset(root, image_size)
    n_train = len(data.view("train"))
    out: dict[str, Any] = {"n_train": n_train, "n_all": len(data)}
    pil = make_torch_dataset(data, "train", train=True)
    out["pil"] = [n_train / epoch_seconds(pil, e) for e in range(2)]
    start = time.perf_counter()
    mm = make_torch_dataset(data, "train", train=True, cache_dir=cache)
    out["build_s"] = build = time.perf_counter() - start
    assert dec.events().get("built") == 1, dec.events()
    out["mm"] = [n_train / (build + epoch_seconds(mm, 0)), n_train / epoch_seconds(mm, 1)]
    out["file_mb"] = mm.path.stat().st_size / 2**20
    out["path"] = mm.path

    def eval_pass(cache_dir: Path | None) -> float:
        seconds = 0.0
        for split in ("train", "val", "test"):
            ds = make_torch_dataset(data, split, train=False, cache_dir=cache_dir)
            seconds += epoch_seconds(ds, 0, shuffle=False, batch=256)
        return len(data) / seconds

    out["eval_pil"], out["eval_mm"] = eval_pass(None), eval_pass(cache)
    return out


# ----------------------------------------------------------------------------- memory


def _rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/<pid>/smaps_rollup (the whole process)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def _range_pss(pid: int, lo: int, hi: int) -> float:
    """kB of PSS in the mappings of /proc/<pid>/smaps that overlap [lo, hi): the pages of
    one array (its own mapping: the memmap'd file, or the anonymous block of a copy)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and ":" not in head:
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a < hi and b > lo
        elif inside and head == "Pss:":
            total += int(line.split()[1])
    return total


def _private_copy(path: Path) -> np.ndarray:
    """The decoded images copied into this process's own anonymous memory (its own mapping,
    so that its pages can be told apart from the rest of the heap)."""
    src = np.load(path, mmap_mode="r")
    buf = mmap.mmap(-1, src.nbytes)
    arr = np.frombuffer(buf, dtype=np.uint8).reshape(src.shape)
    arr[...] = src
    return arr


def _worker(mode: str, root: str, image_size: int, cache: str, ready: Any, done: Any) -> None:
    """One 'trial': every split's dataset, every image read once, then wait to be measured."""
    torch.set_num_threads(1)
    data = dataset(Path(root), image_size)
    held = [make_torch_dataset(data, split, train=False, cache_dir=cache)
            for split in ("train", "val", "test")]
    if mode == "copy":  # what each trial would hold without the shared file
        own = _private_copy(held[0].path)
        for ds in held:
            ds._array = own
        dec._open.clear()
        gc.collect()  # the file mapping is gone; only the private copy remains
    for ds in held:
        for _ in torch.utils.data.DataLoader(ds, batch_size=256):
            pass
    arr = held[0].array
    ready.put((os.getpid(), arr.ctypes.data, arr.ctypes.data + arr.nbytes))
    done.wait()


def memory(root: Path, image_size: int, cache: Path, procs: list[int]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")  # fresh processes: no pages inherited from this one
    rows = []
    for n in procs:
        row: dict[str, Any] = {"n": n}
        for mode in ("memmap", "copy"):
            ready, done = ctx.Queue(), ctx.Event()
            workers = [ctx.Process(target=_worker, args=(mode, str(root), image_size,
                                                         str(cache), ready, done))
                       for _ in range(n)]
            for w in workers:
                w.start()
            try:
                found = [ready.get(timeout=600) for _ in workers]
                whole = [_rollup(pid) for pid, _, _ in found]
                data_pss = [_range_pss(pid, lo, hi) for pid, lo, hi in found]
            finally:
                done.set()
                for w in workers:
                    w.join()
            row[mode] = {
                "pss": statistics.mean(f["Pss"] for f in whole) / 1024,
                "uss": statistics.mean(f["Private_Clean"] + f["Private_Dirty"]
                                       for f in whole) / 1024,
                "data": statistics.mean(data_pss) / 1024,
            }
        rows.append(row)
    return rows


def _maps(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--quick", action="store_true", help="smoke run: 300 images, 1 and 2 procs")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file")
    args = p.parse_args()
    if args.quick:
        args.images, args.procs = 300, [1, 2]
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = make_celeba(Path(tmp) / "celeba", args.images)
        gen_s = time.perf_counter() - start
        cache = Path(tmp) / "cache"
        t = throughput(root, args.image_size, cache)
        dec._open.clear()
        clear_cache()
        gc.collect()
        if _maps(t["path"]):
            print("warning: this process still maps the decoded file; the workers' PSS "
                  "shares are understated", file=sys.stderr)
        mem = memory(root, args.image_size, cache, args.procs)

    size = dec.stored_size(args.image_size)
    pil, mm = t["pil"], t["mm"]
    lines = [
        "### On-disk data path: PIL decode per epoch vs shared decoded memmap",
        "",
        f"`{command('benchmarks/bench_data_path.py')}`",
        "",
        f"Machine: {machine('1 torch thread per process, CPU only')}. Date: {stamp()}.",
        f"Generated CelebA-like folder: {t['n_all']} JPEGs of 178 x 218 (quality 90; written "
        f"in {gen_s:.0f} s, so in the page cache for both paths), image_size "
        f"{args.image_size}, stored squares {size} x {size}; train split {t['n_train']} "
        "images, batch 64, augmented, num_workers 0.",
        "",
        "| train split, images/s | PIL decode each epoch | decoded memmap | ratio memmap/PIL |",
        "|---|---|---|---|",
        f"| epoch 1 (memmap: including the one-off build) | {pil[0]:.0f} | {mm[0]:.0f} | "
        f"{mm[0] / pil[0]:.2f} |",
        f"| epoch 2 (steady state) | {pil[1]:.0f} | {mm[1]:.0f} | **{mm[1] / pil[1]:.2f}** |",
        f"| evaluation pass, all splits, centre crop | {t['eval_pil']:.0f} | "
        f"{t['eval_mm']:.0f} | **{t['eval_mm'] / t['eval_pil']:.2f}** |",
        f"| one-off build (all {t['n_all']} images, once per node) | | {t['build_s']:.1f} s, "
        f"{t['file_mb']:.1f} MB | |",
        "",
        "Memory per trial process, MB, all trials alive, each having read every image once. "
        "PSS counts a page shared by k processes as 1/k; USS counts private pages only.",
        "",
        "| trial processes | PSS of the images: memmap | own copy | ratio memmap/copy | "
        "whole-process PSS: memmap | own copy | whole-process USS: memmap | own copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in mem:
        m, c = row["memmap"], row["copy"]
        lines.append(
            f"| {row['n']} | {m['data']:.1f} | {c['data']:.1f} | **{m['data'] / c['data']:.2f}** "
            f"| {m['pss']:.0f} | {c['pss']:.0f} | {m['uss']:.0f} | {c['uss']:.0f} |")
    lines += ["", f"(The decoded array is {t['file_mb']:.1f} MB. \"PSS of the images\" is "
              "measured on the array's own mapping in /proc/<pid>/smaps; the whole-process "
              "figures, from smaps_rollup, also hold torch, PIL and the interpreter, about the "
              "same in both columns.)", ""]
    text = "\n".join(lines)
    publish(text, args.out)


if __name__ == "__main__":
    main()
