"""Decode once, share everywhere: on-disk images as one memory-mapped uint8 array per node.

Without this, every trial decodes every JPEG with PIL every epoch, and trials packed on one
node each pay for it again. Here the first trial on a node decodes and resizes every image of
the dataset (all splits) once into ``<cache_dir>/decoded/<key>.npy``, an N x S x S x 3 uint8
array in ``.npy`` format, and every trial then opens it with ``np.load(mmap_mode="r")``:
the pages live once in the OS page cache and all trial processes on the node map the same
pages, so memory per extra trial is close to nothing and an epoch is a memory copy plus the
(cheap) augmentation of a small image.

What is stored (the choice, and why). S = ``int(image_size * 256 / 224)``, the size the
evaluation transform resizes to (224 -> 256, 64 -> 73). Each image is resized with the very
same ``torchvision.transforms.Resize(S)`` call as :func:`~debias.data.transforms.eval_transform`
(shorter side to S, PIL bilinear with antialiasing), and the S x S square around its centre is
kept. The square's offset is chosen so that the evaluation centre crop of the stored square
is pixel-for-pixel the crop the on-disk path takes from the whole resized image (the two
roundings of "centre" are composed, see :func:`_window_start`), hence:

- evaluation: ``CenterCrop(image_size)`` of the stored square == the on-disk
  ``Resize(S) + CenterCrop(image_size)``, exactly (identical tensors, tested);
- training: the same ``RandomResizedCrop(image_size, scale=(0.7, 1.0))`` algorithm and
  horizontal flip, as batched tensor ops on the stored square where the model runs
  (:mod:`debias.data.augment`: antialiased bilinear like PIL, random draws from one seed per
  batch), instead of per item on the original photo. Two differences: crops come from the
  centre square only (for CelebA's 178 x 218 portraits, 82% of the frame: the top and bottom
  ~20 px strips of hair and neck are never seen; for landscape Waterbirds photos, the left
  and right edges), and they are cut from an S-pixel image rather than the full-resolution
  one, so a crop (sides ~0.8-1.14x the output size) is resampled at about the output
  resolution instead of being downscaled from a larger photo (slightly softer). Both are the
  usual trade of decode-once pipelines and keep the scene (and its bias) that the
  augmentation is meant to keep.

Size on disk and in the page cache: N * S * S * 3 bytes; CelebA (202,599 images) is 3.2 GB
at image_size 64 and 40 GB at 224, so at 224 it pays off on nodes whose RAM (or local SSD)
holds it.

The key is a hash of the dataset's name, its resolved root (``source``), the ordered list of
image paths, S and :data:`VERSION`. It deliberately leaves out the target and bias attributes
that :meth:`GroupedDataset.identity` includes: the pixels do not depend on them, so a sweep
over two CelebA targets decodes (and caches in RAM) the images once, not twice.

Concurrency, as in :mod:`debias.cache` (both through :mod:`debias.files`): the array is
written into a temporary file in the same folder (``.<key>.npy.<pid>.<random>.tmp``, never a
name a reader opens) and renamed into place with ``os.replace``, so a reader sees nothing
or a whole file; trials on one node hold an ``flock`` on ``<key>.lock`` while building, so
the others wait and reuse it. A file that is present but unreadable or of the wrong shape
(damaged disk, a different numpy) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from debias.data.batches import BatchRequest, HostBatch, finish, host_empty
from debias.data.grouped import GroupedDataset, load_rgb
from debias.files import atomic_output, atomic_write_text, locked

__all__ = ["SUBDIR", "VERSION", "DecodedGroupedDataset", "DecodedSource", "decoded_array",
           "decoded_bytes", "decoded_path", "events", "reset_events", "stored_size"]

log = logging.getLogger(__name__)

VERSION = 1  # bump when what is stored changes (size rule, crop rule, resampling)
SUBDIR = "decoded"

_lock = threading.Lock()
_events: Counter[str] = Counter()  # "built" / "reused", this process
_open: dict[Path, tuple[tuple[int, int, int], np.ndarray]] = {}  # path -> (stat, memmap)


def stored_size(image_size: int) -> int:
    """S, the side of the stored squares: the evaluation transform's resize target."""
    return int(image_size * 256 / 224)


def decoded_bytes(n_images: int, image_size: int) -> int:
    """Size of the decoded array of ``n_images`` at ``image_size`` (the .npy header aside):
    what ``cache.decoded`` needs on disk, and in the page cache to train from memory."""
    size = stored_size(image_size)
    return int(n_images) * size * size * 3


def _centre(length: int, crop: int) -> int:
    """Where torchvision's CenterCrop starts a `crop` long window in `length`."""
    return round((length - crop) / 2.0)  # Python 3 round: an int, half to even, as theirs


def _window_start(length: int, size: int, image_size: int) -> int:
    """Start of the stored `size` window along a side of `length`, chosen so that centre-
    cropping `image_size` from the window starts exactly where centre-cropping it from the
    whole side would (each centre crop rounds on its own, so a plain centred window can be
    one pixel off)."""
    start = _centre(length, image_size) - _centre(size, image_size)
    return min(max(start, 0), length - size)


def decode_one(path: Path, image_size: int) -> np.ndarray:
    """One image as the stored S x S x 3 uint8 square."""
    from torchvision import transforms as T  # imported where used: see data/transforms.py

    size = stored_size(image_size)
    img = T.Resize(size)(load_rgb(path))  # the eval transform's resize, same call
    w, h = img.size
    top, left = _window_start(h, size, image_size), _window_start(w, size, image_size)
    return np.asarray(img)[top:top + size, left:left + size]


def _key(data: GroupedDataset, size: int) -> tuple[str, dict[str, Any]]:
    assert data.image_paths is not None
    listing = hashlib.sha256("\n".join(map(str, data.image_paths)).encode()).hexdigest()
    inputs = {"version": VERSION, "name": data.name, "source": data.source,
              "n_images": len(data.image_paths), "paths_sha256": listing, "size": size,
              "image_size": int(data.image_size)}
    blob = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24], inputs


def decoded_path(data: GroupedDataset, cache_dir: str | Path) -> Path:
    """Where the decoded array of this dataset lives under `cache_dir`."""
    key, _ = _key(data, stored_size(data.image_size))
    return Path(cache_dir) / SUBDIR / f"{key}.npy"


def events() -> dict[str, int]:
    """How many decoded arrays this process built and reused (for tests and reports)."""
    with _lock:
        return dict(_events)


def reset_events() -> None:
    with _lock:
        _events.clear()


def _count(what: str) -> None:
    with _lock:
        _events[what] += 1


def _try_open(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The finished array, memory-mapped read-only (one mapping per file per process), or
    None if there is none or it is unusable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _lock:
        cached = _open.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable decoded-image file %s (%s); rebuilding it", path, exc)
        return None
    if arr.shape != shape or arr.dtype != np.uint8:
        log.warning("ignoring decoded-image file %s: holds %s %s, expected uint8 %s; "
                    "rebuilding it", path, arr.dtype, arr.shape, shape)
        return None
    with _lock:
        _open[path] = (stamp, arr)
    return arr


def _decode_rows(tmp: str, paths: Sequence[Path], start: int, image_size: int) -> int:
    """A pool worker: decode ``paths`` into rows ``start...`` of the array being built."""
    out = np.load(tmp, mmap_mode="r+", allow_pickle=False)
    for i, image_path in enumerate(paths):
        out[start + i] = decode_one(image_path, image_size)
    out.flush()
    del out
    return len(paths)


#: A pool process starts in about a second and a half (a fresh interpreter importing torch),
#: about what decoding this many images at 224 px takes: below it, a process costs more
#: than it saves, so small datasets (tests, rehearsals) decode in the calling process.
MIN_IMAGES_PER_PROCESS = 500


def build_workers() -> int:
    """The CPUs this process may use (the node's, where nothing narrows it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _build(data: GroupedDataset, path: Path, shape: tuple[int, ...], inputs: dict[str, Any],
           progress: bool, workers: int | None = None) -> None:
    """Decode every image into a new array: a pool of processes over the node's CPUs, each
    writing its own rows of the memory-mapped file (decoding is CPU-bound; one process would
    take an hour on CelebA at 224 px)."""
    assert data.image_paths is not None
    paths = list(data.image_paths)
    workers = workers or min(build_workers(), max(1, len(paths) // MIN_IMAGES_PER_PROCESS))
    chunk = max(64, -(-len(paths) // (workers * 8)))
    with atomic_output(path) as tmp:  # synced, then renamed into place when whole
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        del out  # the header is written; workers (or this process) fill the rows
        bar = tqdm(total=len(paths), desc=f"decoding {data.name} to {shape[1]}px (once, "
                   f"{workers} process(es))", unit="img", disable=not progress, mininterval=2.0)
        if workers == 1:
            for start in range(0, len(paths), chunk):
                bar.update(_decode_rows(str(tmp), paths[start:start + chunk], start,
                                        data.image_size))
        else:
            import concurrent.futures as cf
            import multiprocessing as mp

            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                jobs = [pool.submit(_decode_rows, str(tmp), paths[start:start + chunk], start,
                                    data.image_size)
                        for start in range(0, len(paths), chunk)]
                for job in cf.as_completed(jobs):
                    bar.update(job.result())
        bar.close()
    # What the key stands for, for whoever inspects it.
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps({**inputs, "shape": list(shape)}, indent=1, sort_keys=True))


def decoded_array(data: GroupedDataset, cache_dir: str | Path, progress: bool = True
                  ) -> tuple[np.ndarray, Path]:
    """The dataset's decoded images (all splits, in table order), building them if absent."""
    if data.image_paths is None:
        raise ValueError(f"dataset {data.name} is held in memory; nothing to decode")
    size = stored_size(data.image_size)
    key, inputs = _key(data, size)
    path = Path(cache_dir) / SUBDIR / f"{key}.npy"
    shape = (len(data.image_paths), size, size, 3)
    if (arr := _try_open(path, shape)) is not None:
        _count("reused")
        return arr, path
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):
        if (arr := _try_open(path, shape)) is not None:  # another trial built it meanwhile
            _count("reused")
            return arr, path
        log.info("decoding %d %s images to %dpx into %s", shape[0], data.name, size, path)
        _build(data, path, shape, inputs, progress)
        _count("built")
    arr = _try_open(path, shape)
    if arr is None:
        raise RuntimeError(f"decoded-image file {path} was just written but cannot be read")
    return arr, path


class DecodedSource:
    """Batches of a dataset's decoded array, every split: one sorted gather per batch.

    Training requests (with a seed) get the stored S x S squares, to be cropped with the
    batch's seed where the model runs (:func:`debias.data.batches.finish`); evaluation
    requests get the centre ``image_size`` crop at once (the bytes the device needs, no
    more). Picklable without the array (a DataLoader worker maps the file again)."""

    def __init__(self, data: GroupedDataset, cache_dir: str | Path, progress: bool = True
                 ) -> None:
        self.data = data
        self.image_size = int(data.image_size)
        self.size = stored_size(self.image_size)
        self.shape = (len(data), self.size, self.size, 3)
        self._array: np.ndarray | None
        self._array, self.path = decoded_array(data, cache_dir, progress)
        self.crop_at = _centre(self.size, self.image_size)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:  # unpickled in a DataLoader worker: map the file again
            self._array = _try_open(self.path, self.shape)
            if self._array is None:
                raise RuntimeError(f"decoded-image file {self.path} is gone or unreadable")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap would copy the whole array into the message; send the path.
        return {**self.__dict__, "_array": None}

    def fetch(self, request: BatchRequest, pin: bool = False) -> HostBatch:
        rows = self.data.view(request.split).index[request.positions]
        positions = torch.as_tensor(np.asarray(request.positions, dtype=np.int64))
        arr, n = self.array, len(rows)
        if request.seed is not None:
            squares = host_empty((n, self.size, self.size, 3), pin=pin)
            # mode="clip": the rows are valid, and the default mode buffers `out` (a copy).
            np.take(arr, rows, axis=0, out=squares.numpy(), mode="clip")
            return HostBatch(squares, positions, "squares", request.seed)
        a, s = self.crop_at, self.image_size
        crops = host_empty((n, s, s, 3), pin=pin)
        out = crops.numpy()
        for i, row in enumerate(rows):
            out[i] = arr[row, a:a + s, a:a + s]
        return HostBatch(crops, positions, "crops")


class DecodedGroupedDataset(torch.utils.data.Dataset):
    """One split of the decoded array as a map-style torch Dataset, for code that iterates a
    plain DataLoader (stages, export); items as every grouped dataset's: (normalised float
    3 x image_size x image_size tensor, position into the split's view). A batch asked for
    with ``__getitems__`` is one gather and one batched crop, seeded by one draw from torch's
    global generator (so a fixed torch seed fixes the augmentation). Trials use
    :class:`debias.data.pipeline.InputPipeline` instead, whose seeds are per batch."""

    def __init__(self, data: GroupedDataset, split: str, train: bool,
                 cache_dir: str | Path, progress: bool = True) -> None:
        self.view = data.view(split)
        self.split = split
        self.train = train
        self.source = DecodedSource(data, cache_dir, progress)
        self.image_size = self.source.image_size
        self.path = self.source.path

    @property
    def array(self) -> np.ndarray:
        return self.source.array

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([position])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        positions = [int(p) for p in positions]
        seed = int(torch.randint(0, 2**31 - 1, ())) if self.train else None
        batch = self.source.fetch(BatchRequest(self.split, np.asarray(positions, np.int64),
                                               seed))
        images = finish(batch, self.image_size, torch.device("cpu"))
        return [(images[i], p) for i, p in enumerate(positions)]
