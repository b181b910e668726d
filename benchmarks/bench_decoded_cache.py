"""Decoded-image cache placement at CelebA scale: the one-off build, serial vs the process
pool, and steady-state images/s for each `cache.decoded` choice, in one run.

A CelebA-like folder (Kaggle layout; N JPEGs of 178 x 218, CelebA's 80/10/10 splits; the
generator of bench_data_path.py) is written to a temp dir, then at `--image-size` (224 by
default, as the CelebA sweep files use):

1. The build of the decoded array (every image of every split, once per node): with one
   process, then with the pool over this node's CPUs (`debias.data.decoded.build_workers`),
   each into a fresh folder.
2. A training epoch over the train split (batch 64, shuffled, augmented, num_workers 0, as a
   trial reads it) for `shared` (the memmap in the sweep's storage), `local` (the memmap in a
   node-local folder, `cache.local_dir`) and `off` (PIL decode and resize per item). On this
   machine both folders are on the same local disk, so `shared` and `local` measure the
   same thing here; they differ where storage is a network file system (EFS, NFS), which
   this machine does not have.

    python benchmarks/bench_decoded_cache.py [--images 20000] [--image-size 224]
        [--quick] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from bench_common import command, machine, publish, stamp
from bench_data_path import dataset, epoch_seconds, make_celeba

from debias.data import clear_cache, make_torch_dataset
from debias.data import decoded as dec


def build_seconds(data, folder: Path, workers: int) -> float:
    """Seconds to build the decoded array from scratch with `workers` processes."""
    dec._open.clear()
    original = dec.build_workers
    dec.build_workers = lambda: workers
    try:
        start = time.perf_counter()
        dec.decoded_array(data, folder, progress=False)
        return time.perf_counter() - start
    finally:
        dec.build_workers = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--quick", action="store_true", help="smoke run: 600 images at 64 px")
    p.add_argument("--out", type=Path, default=None, help="append the section to this file")
    args = p.parse_args()
    if args.quick:
        args.images, args.image_size = 600, 64
    torch.set_num_threads(1)
    pool = dec.build_workers()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = make_celeba(Path(tmp) / "celeba", args.images)
        gen_s = time.perf_counter() - start
        data = dataset(root, args.image_size)
        n_train = len(data.view("train"))
        serial = build_seconds(data, Path(tmp) / "serial", 1)
        shutil.rmtree(Path(tmp) / "serial")
        built = build_seconds(data, Path(tmp) / "shared", pool)
        size_gb = dec.decoded_path(data, Path(tmp) / "shared").stat().st_size / 2**30
        shutil.copytree(Path(tmp) / "shared", Path(tmp) / "local")  # a node's own copy
        rates = {}
        for name, folder in (("shared", Path(tmp) / "shared"), ("local", Path(tmp) / "local"),
                             ("off", None)):
            dec._open.clear()
            clear_cache()
            ds = make_torch_dataset(data, "train", train=True, cache_dir=folder)
            epoch_seconds(ds, 0)  # warm: the page cache holds what the next epoch reads
            rates[name] = n_train / epoch_seconds(ds, 1)

    side = dec.stored_size(args.image_size)
    lines = [
        "### Decoded-image cache: build and placement at CelebA scale",
        "",
        f"`{command('benchmarks/bench_decoded_cache.py')}`",
        "",
        f"Machine: {machine('1 torch thread, CPU only')}. Date: {stamp()}.",
        f"Generated CelebA-like folder: {args.images:,} JPEGs of 178 x 218 (written in "
        f"{gen_s:.0f} s), image_size {args.image_size}, stored squares {side} x {side}: a "
        f"decoded array of {size_gb:.2f} GiB; train split {n_train:,} images, batch 64, "
        "augmented, num_workers 0.",
        "",
        "| one-off build, all splits | 1 process | pool of "
        f"{pool} | ratio pool/1 |",
        "|---|---|---|---|",
        f"| seconds | {serial:.1f} | {built:.1f} | **{built / serial:.2f}** |",
        f"| images/s | {args.images / serial:.0f} | {args.images / built:.0f} | |",
        "",
        "| `cache.decoded` | train images/s, steady state | ratio to `off` |",
        "|---|---|---|",
        *(f"| `{name}` | {rate:.0f} | **{rate / rates['off']:.2f}** |"
          for name, rate in rates.items()),
        "",
        "(`shared` and `local` are the same code reading a memmap from two folders of one "
        "local disk here, hence the same figure; on EFS/NFS `shared` pays the network on every "
        "page the page cache does not hold, which at "
        f"{size_gb:.1f} GiB and beyond a node's RAM is most of them: that is what `local` "
        "avoids, at the price of one build per node.)",
        "",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
