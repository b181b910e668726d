"""The input pipeline of a trial: batches of a grouped dataset, delivered to the trial's
device at its rate.

What a pass iterates are :class:`~debias.data.batches.BatchRequest` objects, one per batch:
the source reads a batch in one call (one sorted gather from the decoded cache), and every
random draw of the batch follows from the request's seed, derived from (trial seed,
"augment", epoch, batch number). So the batches of an epoch do not depend on how many
feeders serve them, on which thread or process crops them, or on whether the trial was
resumed: a trial resumed at epoch k sees exactly the batches an uninterrupted run sees.

Where the images come from (:func:`make_source`):

- in memory (the embedded dataset): each split normalised once; a batch is a slice, never
  augmented (digits are not mirror-symmetric, and the images are already at size);
- the decoded cache (on-disk datasets, ``cache.decoded: shared | local``): one sorted
  gather of uint8 rows from the memory-mapped array (:class:`~debias.data.decoded.DecodedSource`);
  training batches cross to the device as uint8 squares and are cropped, flipped and
  normalised there (:mod:`debias.data.augment`);
- the image files (``cache.decoded: off``): decoded with PIL, cropped per photo with the
  batch's draws, normalised on the device.

Who fetches (:class:`InputPipeline`): ``workers`` feeders, each up to ``prefetch_factor``
batches ahead of the trial, persistent across the trial's passes (training epochs and
evaluation share them): threads for the decoded cache (a gather is a memory copy that
releases the GIL; measured, handing 12 MB batches between processes costs several times the
gather itself), DataLoader worker processes for image files (PIL holds the GIL for much of
its work). On a GPU the feeders gather uint8 into pinned memory (torch's caching host
allocator reuses each block once its copy to the GPU is done) and the GPU does the rest; on
a CPU trial with feeders, they also crop and normalise, overlapping the training step (the
result is the same: the draws come from the batch's seed).

How many (``train.num_workers: auto``, :func:`loader_workers`): none for in-memory data (a
batch is a slice); otherwise the CPUs the trial holds (``resources.cpu``) on a GPU trial,
one fewer on a CPU trial (whose own thread computes the model).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from debias.data.augment import BoxDraws
from debias.data.batches import BatchRequest, HostBatch, finish, host_empty
from debias.data.decoded import DecodedSource, stored_size
from debias.data.grouped import GroupedDataset, load_rgb
from debias.data.transforms import normalize_uint8
from debias.seeding import derive_seed

__all__ = ["FileSource", "InputPipeline", "MemorySource", "PipelineDataset", "Source",
           "epoch_requests", "loader_workers", "make_source", "split_requests"]


class Source(Protocol):
    """Where a pipeline's images come from: a grouped dataset, read a batch at a time."""

    data: GroupedDataset

    def fetch(self, request: BatchRequest, pin: bool = False) -> HostBatch: ...


class MemorySource:
    """In-memory images (the embedded dataset): every split normalised once, on first use;
    a batch is one ``index_select``. Never augmented (see the module docstring)."""

    def __init__(self, data: GroupedDataset) -> None:
        if data.images is None:
            raise ValueError(f"dataset {data.name} is not held in memory")
        self.data = data
        self._splits: dict[str, torch.Tensor] = {}

    def split_tensor(self, split: str) -> torch.Tensor:
        if split not in self._splits:
            assert self.data.images is not None
            self._splits[split] = normalize_uint8(self.data.images[self.data.view(split).index])
        return self._splits[split]

    def fetch(self, request: BatchRequest, pin: bool = False) -> HostBatch:
        positions = torch.as_tensor(np.asarray(request.positions, dtype=np.int64))
        images = self.split_tensor(request.split).index_select(0, positions)
        return HostBatch(images.pin_memory() if pin else images, positions, "ready")


class FileSource:
    """Image files decoded with PIL per batch (``cache.decoded: off``): evaluation is the
    eval transform's resize and centre crop; training crops each photo (at its own size)
    with the batch's draws, so the two paths share the random stream of the decoded one."""

    def __init__(self, data: GroupedDataset) -> None:
        if data.image_paths is None:
            raise ValueError(f"dataset {data.name} has no image files")
        self.data = data
        self.image_size = int(data.image_size)

    def fetch(self, request: BatchRequest, pin: bool = False) -> HostBatch:
        from torchvision.transforms import functional as TF  # imported where used

        assert self.data.image_paths is not None
        rows = self.data.view(request.split).index[request.positions]
        images = [load_rgb(self.data.image_paths[r]) for r in rows]
        s = self.image_size
        if request.seed is None:
            size = stored_size(s)
            images = [TF.center_crop(TF.resize(img, size), [s, s]) for img in images]
        else:
            boxes = BoxDraws.sample(request.seed, len(images)).boxes(
                [img.height for img in images], [img.width for img in images])
            crops = []
            for i, img in enumerate(images):
                top, left, h, w, flip = boxes.one(i)
                crop = TF.resized_crop(img, top, left, h, w, [s, s])
                crops.append(TF.hflip(crop) if flip else crop)
            images = crops
        out = host_empty((len(images), s, s, 3), pin=pin)
        array = out.numpy()
        for i, img in enumerate(images):
            array[i] = np.asarray(img)
        positions = torch.as_tensor(np.asarray(request.positions, dtype=np.int64))
        return HostBatch(out, positions, "crops")


def make_source(data: GroupedDataset, cache_dir: str | Path | None = None,
                progress: bool = True) -> Source:
    """In-memory images, else the decoded cache under ``cache_dir``, else the files."""
    if data.images is not None:
        return MemorySource(data)
    if cache_dir is not None:
        return DecodedSource(data, cache_dir, progress)
    return FileSource(data)


def _finished(batch: HostBatch, image_size: int) -> HostBatch:
    """A CPU trial's batch cropped and normalised where it was fetched (a worker process or
    thread), so the work overlaps the training step."""
    if batch.stage == "ready":
        return batch
    out = host_empty((len(batch), 3, image_size, image_size), torch.float32)
    images = finish(batch, image_size, torch.device("cpu"), out=out)
    return HostBatch(images, batch.positions, "ready")


class PipelineDataset(torch.utils.data.Dataset):
    """The DataLoader's dataset where batches are fetched by worker processes: a source
    asked for whole batches (``__getitems__`` receives a :class:`BatchRequest`). With
    ``finish_here`` (a CPU trial's workers) batches leave finished: cropped, normalised, in
    shared memory."""

    def __init__(self, source: Source, finish_here: bool = False) -> None:
        self.source = source
        self.finish_here = finish_here
        self.image_size = int(source.data.image_size)

    def __len__(self) -> int:
        return len(self.source.data)

    def __getitem__(self, index: int) -> Any:
        raise TypeError("PipelineDataset serves whole batches: iterate it with a batch "
                        "sampler of BatchRequest objects")

    def __getitems__(self, request: BatchRequest) -> HostBatch:
        batch = self.source.fetch(request)
        return _finished(batch, self.image_size) if self.finish_here else batch


class _Requests(torch.utils.data.Sampler[BatchRequest]):
    """The batch sampler: the requests of the current pass (set before each pass; it is
    read in the trial's process, so persistent workers see the new ones)."""

    def __init__(self) -> None:
        self.requests: list[BatchRequest] = []

    def __iter__(self) -> Iterator[BatchRequest]:
        return iter(self.requests)

    def __len__(self) -> int:
        return len(self.requests)


def _as_is(batch: HostBatch) -> HostBatch:
    """The collate function: a source already returns one whole batch."""
    return batch


def epoch_requests(order: Sequence[int] | np.ndarray, batch_size: int, seed: int, epoch: int,
                   augment: bool, split: str = "train") -> list[BatchRequest]:
    """An epoch's batches: consecutive ``batch_size`` chunks of ``order`` (the method's),
    each sorted (one ordered gather; the loss does not depend on the order within a batch),
    each with its augmentation seed (seed, "augment", epoch, batch number) when augmented."""
    order = np.asarray(order, dtype=np.int64)
    return [BatchRequest(split, np.sort(order[start:start + batch_size]),
                         derive_seed(seed, "augment", epoch, i) if augment else None)
            for i, start in enumerate(range(0, len(order), batch_size))]


def split_requests(n: int, batch_size: int, split: str) -> list[BatchRequest]:
    """An evaluation pass over a split of ``n`` images, in position order."""
    return [BatchRequest(split, np.arange(start, min(start + batch_size, n), dtype=np.int64))
            for start in range(0, n, batch_size)]


def loader_workers(setting: int | str, device: torch.device, cpus: int,
                   in_memory: bool) -> int:
    """Feeders of a trial (threads, or processes for image files): ``train.num_workers``
    when a number; for ``auto``, none for in-memory data, the trial's CPUs on a GPU (its
    process mostly waits on the GPU), one fewer on a CPU (its process computes the model)."""
    if setting != "auto":
        return int(setting)
    if in_memory:
        return 0
    return max(0, int(cpus) if device.type == "cuda" else int(cpus) - 1)


class InputPipeline:
    """Batches of every split of one dataset, on one device, for one trial.

    ``workers`` feeders fetch up to ``prefetch_factor`` batches each ahead of the trial:
    threads for the decoded cache and in-memory data (a gather is a memory copy that
    releases the GIL; handing a batch between processes costs more than the gather itself:
    BENCHMARKS.md, "Input pipeline"), DataLoader worker processes, persistent across passes,
    for image files (PIL decoding holds the GIL for much of its work). With none, batches
    are fetched in the trial's thread. ``wait_s`` accumulates the time the trial's thread
    spent waiting for batches (for a batch to arrive, the host-to-device copy call and, on a
    CPU without feeders, the augmentation): what ``perf/data_wait_frac`` reports per epoch.
    """

    def __init__(self, data: GroupedDataset, *, cache_dir: str | Path | None = None,
                 device: torch.device | str = "cpu", augment: bool = False, seed: int = 0,
                 workers: int = 0,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 prefetch_factor: int = 2, progress: bool = True,
                 crop_in_feeders: bool | None = None) -> None:
        self.data = data
        self.device = torch.device(device)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.workers = int(workers)
        self.memory_format = memory_format
        self.prefetch_factor = max(1, int(prefetch_factor))
        self.source = make_source(data, cache_dir, progress)
        self.in_memory = isinstance(self.source, MemorySource)
        self.image_size = int(data.image_size)
        self.pin = self.device.type == "cuda"
        #: Feeders crop and normalise too on a CPU trial (it overlaps the training step);
        #: on a GPU the GPU does (``crop_in_feeders`` overrides, e.g. to measure feeding).
        self.finish_here = self.workers > 0 and (
            self.device.type == "cpu" if crop_in_feeders is None else crop_in_feeders)
        self.processes = self.workers > 0 and isinstance(self.source, FileSource)
        self.dataset = PipelineDataset(self.source, finish_here=self.finish_here)
        self._requests = _Requests()
        self._loader: DataLoader | None = None
        self._threads: ThreadPoolExecutor | None = None
        self.wait_s = 0.0

    # ------------------------------------------------------------------ feeding the host

    def _fetch(self, request: BatchRequest) -> HostBatch:
        batch = self.source.fetch(request, pin=self.pin)
        return _finished(batch, self.image_size) if self.finish_here else batch

    def _from_processes(self, requests: list[BatchRequest]) -> Iterator[HostBatch]:
        if self._loader is None:
            self._loader = DataLoader(
                self.dataset, batch_sampler=self._requests, collate_fn=_as_is,
                num_workers=self.workers, pin_memory=self.pin, persistent_workers=True,
                prefetch_factor=self.prefetch_factor)
        self._requests.requests = requests
        yield from self._loader

    def _from_threads(self, requests: list[BatchRequest]) -> Iterator[HostBatch]:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="batches")
        ahead: deque[Future[HostBatch]] = deque()
        queue = iter(requests)
        try:
            for request in itertools.islice(queue, self.workers * self.prefetch_factor):
                ahead.append(self._threads.submit(self._fetch, request))
            while ahead:
                batch = ahead.popleft().result()
                if (request := next(queue, None)) is not None:
                    ahead.append(self._threads.submit(self._fetch, request))
                yield batch
        finally:
            for future in ahead:  # a pass left early: drop what was fetched ahead
                future.cancel()

    def host_batches(self, requests: Iterable[BatchRequest]) -> Iterator[HostBatch]:
        """The batches as the feeders deliver them to the trial's thread (pinned on a CUDA
        trial), before the device's part: what the CPU side of a GPU trial costs."""
        requests = list(requests)
        if not requests:
            return
        if self.workers == 0:
            yield from map(self._fetch, requests)
        elif self.processes:
            yield from self._from_processes(requests)
        else:
            yield from self._from_threads(requests)

    # ------------------------------------------------------------------ onto the device

    def batches(self, requests: Iterable[BatchRequest]) -> Iterator[tuple[torch.Tensor,
                                                                          torch.Tensor]]:
        """(images on the device, positions on the host) per request, in order."""
        clock = time.perf_counter
        start = clock()
        for host in self.host_batches(requests):
            images = finish(host, self.image_size, self.device, self.memory_format)
            self.wait_s += clock() - start
            yield images, host.positions
            start = clock()
        self.wait_s += clock() - start

    def epoch(self, order: Sequence[int] | np.ndarray, batch_size: int, epoch: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A training epoch visiting ``order`` (augmented if the pipeline augments)."""
        return self.batches(epoch_requests(order, batch_size, self.seed, epoch, self.augment))

    def split(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor,
                                                                   torch.Tensor]]:
        """An evaluation pass over ``split`` (the evaluation transform), in position order."""
        return self.batches(split_requests(len(self.data.view(split)), batch_size, split))

    def close(self) -> None:
        """Stop the feeders (a later pass starts them again)."""
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._threads = None
        self._loader = None  # the persistent iterator and its worker processes go with it

    def __del__(self) -> None:
        threads, self._threads, self._loader = getattr(self, "_threads", None), None, None
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)
