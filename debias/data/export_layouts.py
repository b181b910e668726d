"""The embedded benchmark written to disk in the published layouts of the real datasets, so
the real-data path (JPEG decoding, the decoded cache, the batched pipeline, stage tasks,
GradCAM at full size) runs anywhere, with no download: in CI, and on a new cluster before the
real data is copied there.

    python launch.py --write-dataset waterbirds DIR [--images N] [--image-size 224|WxH]

writes ``DIR/waterbird_complete95_forest2water2/`` (the Waterbirds release: ``metadata.csv``
with ``img_id, img_filename, y, split, place, place_filename`` and one folder per "species",
here per digit), ``celeba`` writes ``DIR/celeba/`` in Kaggle's layout
(``list_attr_celeba.csv``, ``list_eval_partition.csv``, ``img_align_celeba/img_align_celeba/``),
``celeba-official`` in the official one (``Anno/list_attr_celeba.txt``,
``Eval/list_eval_partition.txt``, ``Img/img_align_celeba/``), and ``metadata`` writes
``DIR/metadata/`` for ``dataset: {name: metadata}`` (``metadata.csv`` with ``path, split``
and the attributes ``digit`` (ten classes), ``Odd``, ``High``, ``Loopy``, ``Background``).
So ``DEBIAS_DATA=DIR`` makes the shipped ``sweeps/*_waterbirds.yaml`` and
``sweeps/*_celeba.yaml`` find their data.

What the images are: the embedded benchmark's (MNIST digits on land or water textures,
target ``Odd``, bias ``Background`` with its training correlation 0.95, validation and test
group-balanced), rendered at the requested size (non-square sizes are the square rendering
resized, so no digit is cut off) and saved as JPEG (quality 90). Waterbirds' ``y`` is
``Odd`` and ``place`` is ``Background``; CelebA's ``Blond_Hair`` is ``Odd``, ``Male`` is
``Background``, ``Smiling`` is ``High`` and ``Eyeglasses`` is ``Loopy``; the other 36 CelebA
attributes are filled at random (p = 1/2, seeded), so any of them works as a target with
every group present. More than 1,000 images are rendered 1,000 at a time, each batch a data
seed of its own (the digits of the batches overlap; the images do not); fewer than 100 (the
embedded minimum; for CI rehearsals) are a subset of 100 that keeps every group in every
split.

The folder is written under a temporary name and renamed into place when complete; an
existing non-empty folder is never overwritten.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from debias.data import celeba
from debias.data import synthetic as embedded
from debias.data.grouped import DatasetError

__all__ = ["DEFAULT_SIZES", "FOLDERS", "LAYOUTS", "parse_size", "write_dataset"]

LAYOUTS: tuple[str, ...] = ("waterbirds", "celeba", "celeba-official", "metadata")
#: Where each layout goes under DIR: the names the shipped sweep files expect.
FOLDERS: dict[str, str] = {"waterbirds": "waterbird_complete95_forest2water2",
                           "celeba": "celeba", "celeba-official": "celeba",
                           "metadata": "metadata"}
#: (width, height): CelebA's aligned crops are 178 x 218; Waterbirds' photos vary.
DEFAULT_SIZES: dict[str, tuple[int, int]] = {"waterbirds": (256, 256), "celeba": (178, 218),
                                             "celeba-official": (178, 218),
                                             "metadata": (256, 256)}
#: CelebA attributes that carry an embedded attribute; the rest are drawn at random.
CELEBA_FROM_EMBEDDED: dict[str, str] = {"Blond_Hair": "Odd", "Male": "Background",
                                        "Smiling": "High", "Eyeglasses": "Loopy"}
CHUNK = 1000  # images rendered at once (the float canvas of 1,000 at 256 px is 0.8 GB)
MIN_EMBEDDED = 100  # the embedded benchmark's smallest size (synthetic.load)
MIN_IMAGES = 24  # fewer and a minority group could not be in every split
QUALITY = 90


def parse_size(text: str) -> tuple[int, int]:
    """``224`` or ``178x218`` (width x height) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 8 or max(values) > 4096:
        raise ValueError(f"got {text!r}; expected a side in pixels (e.g. 224) or WIDTHxHEIGHT "
                         "(e.g. 178x218), each between 8 and 4096")
    return (values[0], values[-1])


@dataclass(frozen=True)
class _Chunk:
    """Up to CHUNK images of the embedded benchmark and all of their attributes."""

    ids: list[str]
    split: np.ndarray
    images: np.ndarray
    attrs: dict[str, np.ndarray]  # Odd, High, Loopy, Background, digit


def _subset(split: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """About ``n`` rows with every (split, group) cell kept, each cut in proportion (at least
    one row): fewer images than the embedded minimum, every group still in every split."""
    keep = []
    for cell in sorted(set(zip(split.tolist(), group.tolist(), strict=True))):
        rows = np.flatnonzero((split == cell[0]) & (group == cell[1]))
        keep.append(rows[:max(1, round(len(rows) * n / len(split)))])
    return np.sort(np.concatenate(keep))


def _chunks(n: int, side: int, seed: int) -> Iterator[_Chunk]:
    """The embedded dataset, ``n`` images at ``side`` px, CHUNK at a time (data seeds
    seed, seed + 1, ...; under 100 images, a subset of 100 keeping every group in every
    split)."""
    k = -(-n // CHUNK)
    sizes = [n // k + (i < n % k) for i in range(k)]
    _, labels = embedded._digits()
    for i, size in enumerate(sizes):
        data = embedded.load({"name": "synthetic", "image_size": side, "seed": seed + i,
                              "size": max(size, MIN_EMBEDDED)}, "Odd", "Background")
        assert data.images is not None
        rows = (np.arange(len(data)) if size >= MIN_EMBEDDED
                else _subset(np.asarray(data.split), np.asarray(data.y * 2 + data.a), size))
        digits = np.asarray([int(x.removeprefix("mnist")) for x in data.ids[rows]])
        digit_attrs = embedded._digit_attributes(labels[digits])
        assert np.array_equal(digit_attrs["Odd"], data.y[rows])
        yield _Chunk(ids=[f"{i:02d}{x.removeprefix('mnist')}" for x in data.ids[rows]],
                     split=np.asarray(data.split[rows]), images=np.asarray(data.images[rows]),
                     attrs={**digit_attrs, "Background": np.asarray(data.a[rows]),
                            "digit": labels[digits].astype(np.int64)})


def _save_all(jobs: list[tuple[np.ndarray, Path]], size: tuple[int, int]) -> None:
    def save(job: tuple[np.ndarray, Path]) -> None:
        pixels, path = job
        img = Image.fromarray(pixels)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=QUALITY)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(save, jobs))


def _pm1(values: np.ndarray) -> list[str]:
    return ["1" if v else "-1" for v in values]


def write_dataset(layout: str, folder: str | Path, images: int = 1000,
                  size: tuple[int, int] | None = None, seed: int = 0) -> Path:
    """Write ``images`` images of the embedded benchmark under ``folder`` in ``layout``;
    returns the dataset's root (what ``dataset.root`` names)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if images < MIN_IMAGES:
        raise ValueError(f"got {images} images; expected at least {MIN_IMAGES} (so every "
                         "group is in every split)")
    width, height = size or DEFAULT_SIZES[layout]
    root = Path(folder).expanduser().resolve() / FOLDERS[layout]
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root} already exists and is not empty; write into another "
                           "folder, or delete it first")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write(layout, tmp, images, (width, height), seed)
        if root.exists():
            root.rmdir()  # empty: checked above
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write(layout: str, root: Path, n: int, size: tuple[int, int], seed: int) -> None:
    side = max(size)
    rows: list[dict[str, object]] = []
    rng = np.random.default_rng([seed, 20])  # the CelebA attributes the benchmark lacks
    for chunk in _chunks(n, side, seed):
        jobs = []
        for j, image_id in enumerate(chunk.ids):
            row: dict[str, object] = {"id": image_id, "split": int(chunk.split[j]),
                                      **{k: int(v[j]) for k, v in chunk.attrs.items()}}
            row["file"] = _file_name(layout, len(rows) + 1, row)
            jobs.append((chunk.images[j], root / _image_dir(layout) / str(row["file"])))
            rows.append(row)
        _save_all(jobs, size)
    if layout == "waterbirds":
        _waterbirds_csv(root, rows)
    elif layout == "metadata":
        _metadata_csv(root, rows)
    else:
        random_attrs = {name: rng.random(len(rows)) < 0.5 for name in celeba.ATTRIBUTES}
        table = {name: (np.asarray([r[CELEBA_FROM_EMBEDDED[name]] for r in rows], bool)
                        if name in CELEBA_FROM_EMBEDDED else random_attrs[name])
                 for name in celeba.ATTRIBUTES}
        _celeba_files(root, layout, rows, table)


def _image_dir(layout: str) -> str:
    return {"waterbirds": "", "metadata": "images", "celeba": "img_align_celeba/img_align_celeba",
            "celeba-official": "Img/img_align_celeba"}[layout]


def _file_name(layout: str, number: int, row: dict[str, object]) -> str:
    if layout == "waterbirds":  # CUB's "<class number>.<species>/<species>_<id>.jpg"
        digit = int(row["digit"])  # type: ignore[call-overload]
        return f"{digit + 1:03d}.Digit_{digit}/Digit_{digit}_{row['id']}.jpg"
    if layout == "metadata":
        return f"{row['id']}.jpg"
    return f"{number:06d}.jpg"


def _waterbirds_csv(root: Path, rows: list[dict[str, object]]) -> None:
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for number, r in enumerate(rows, start=1):
            place = "water" if r["Background"] else "land"
            writer.writerow([number, r["file"], r["Odd"], r["split"], r["Background"],
                             f"/synthetic/{place}/{r['id']}.jpg"])


def _metadata_csv(root: Path, rows: list[dict[str, object]]) -> None:
    names = ("train", "val", "test")
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "split", "digit", "Odd", "High", "Loopy", "Background"])
        for r in rows:
            writer.writerow([f"images/{r['file']}", names[int(r["split"])],  # type: ignore[call-overload]
                             r["digit"], r["Odd"], r["High"], r["Loopy"], r["Background"]])


def _celeba_files(root: Path, layout: str, rows: list[dict[str, object]],
                  table: dict[str, np.ndarray]) -> None:
    files = [str(r["file"]) for r in rows]
    splits = [str(r["split"]) for r in rows]
    columns = [_pm1(table[name]) for name in celeba.ATTRIBUTES]
    if layout == "celeba":
        with (root / "list_attr_celeba.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", *celeba.ATTRIBUTES])
            for i, name in enumerate(files):
                writer.writerow([name, *(c[i] for c in columns)])
        with (root / "list_eval_partition.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", "partition"])
            writer.writerows(zip(files, splits, strict=True))
        return
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    lines = [str(len(files)), " ".join(celeba.ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{c[i]:>2}" for c in columns)
              for i, name in enumerate(files)]
    (root / "Anno" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "Eval" / "list_eval_partition.txt").write_text(
        "".join(f"{name} {s}\n" for name, s in zip(files, splits, strict=True)))


def write_dataset_command(layout: str, folder: str, images: int = 1000,
                          size: str | None = None) -> int:
    """``launch.py --write-dataset LAYOUT DIR``: write, then say where and how to use it."""
    import sys
    import time

    try:
        parsed = parse_size(size) if size is not None else None
        if layout not in LAYOUTS:
            raise ValueError(f"got layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    except ValueError as exc:
        print(f"error: --write-dataset: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        root = write_dataset(layout, folder, images, parsed)
    except (DatasetError, OSError) as exc:
        print(f"error: --write-dataset: {exc}", file=sys.stderr)
        return 1
    width, height = parsed or DEFAULT_SIZES[layout]
    dataset = {"waterbirds": "waterbirds", "metadata": "metadata"}.get(layout, "celeba")
    example = {"waterbirds": "sweeps/cfix_waterbirds.yaml", "celeba": "sweeps/jtt_celeba.yaml",
               "celeba-official": "sweeps/jtt_celeba.yaml"}.get(layout)
    print(f"wrote {images} images ({width} x {height}, the embedded benchmark) in the {layout} "
          f"layout to {root} in {time.perf_counter() - start:.0f} s")
    if example:
        print(f"run a shipped sweep on it: DEBIAS_DATA={root.parent} python launch.py "
              f"{example}")
    else:
        print(f"use it in a sweep file: dataset: {{name: {dataset}, root: {root}}}, targets "
              "among digit, Odd, High, Loopy, Background")
    return 0
