"""Tests for debias.data.decoded: on-disk images decoded once into a shared memory-mapped array.

Fixtures are tiny CelebA folders (Kaggle layout) of textured JPEGs written into tmp_path.
"""

from __future__ import annotations

import csv
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from debias.data import clear_cache, load_grouped, make_torch_dataset
from debias.data import decoded as dec
from debias.data.celeba import ATTRIBUTES
from debias.data.torch_data import OnDiskGroupedDataset

# Portrait like CelebA, landscape like Waterbirds, and odd sizes, so both axes and both
# parities of the centre-crop rounding are exercised.
SIZES = [(36, 44), (44, 36), (37, 45), (40, 40), (33, 50), (51, 34), (36, 44), (45, 38),
         (36, 44), (39, 41), (36, 44), (47, 35)]
SPLIT = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.fixture(autouse=True)
def _fresh():
    clear_cache()
    dec.reset_events()
    yield
    clear_cache()


def make_celeba(root: Path, sizes=SIZES) -> Path:
    """Kaggle layout: two CSVs and JPEGs with texture (so resampling and JPEG matter)."""
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"{i + 1:06d}.jpg" for i in range(len(sizes))]
    with (root / "list_attr_celeba.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", *ATTRIBUTES])
        for i, image_id in enumerate(ids):
            writer.writerow([image_id, *(1 if (i + j) % 3 == 0 else -1
                                         for j in range(len(ATTRIBUTES)))])
    with (root / "list_eval_partition.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image_id", "partition"])
        writer.writerows(zip(ids, SPLIT, strict=True))
    for image_id, (w, h) in zip(ids, sizes, strict=True):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(
            folder / image_id, quality=90)
    return root


def _data(root: Path, image_size: int = 16, target: str = "Male", bias: str = "Young"):
    return load_grouped({"name": "celeba", "root": str(root), "image_size": image_size},
                        target, bias)


def test_eval_items_equal_the_pil_path_exactly(tmp_path):
    """Exact equality, not a tolerance: both paths decode the same JPEG with the same PIL,
    resize with the same torchvision Resize call, and the stored square is placed so that
    its centre crop is the very window the on-disk centre crop takes (normalisation is the
    same float32 arithmetic)."""
    data = _data(make_celeba(tmp_path / "celeba"))
    for split in ("train", "val", "test"):
        disk = make_torch_dataset(data, split, train=False)
        mm = make_torch_dataset(data, split, train=False, cache_dir=tmp_path / "cache")
        assert isinstance(disk, OnDiskGroupedDataset)
        assert isinstance(mm, dec.DecodedGroupedDataset)
        assert len(mm) == len(disk) == len(data.view(split))
        for p in range(len(disk)):
            x, pos = mm[p]
            y, _ = disk[p]
            assert pos == p and x.shape == (3, 16, 16) and x.dtype == torch.float32
            assert torch.equal(x, y), (split, p)
        positions = [len(mm) - 1, 0, 1][: len(mm)]
        batch = mm.__getitems__(positions)
        assert [p for _, p in batch] == positions
        for xb, p in batch:
            assert torch.equal(xb, disk[p][0])
    assert dec.events() == {"built": 1, "reused": 2}


def test_stored_array_layout(tmp_path):
    data = _data(make_celeba(tmp_path / "celeba"), image_size=16)
    arr, path = dec.decoded_array(data, tmp_path / "cache")
    size = dec.stored_size(16)
    assert size == 18
    assert isinstance(arr, np.memmap) and arr.shape == (len(data), size, size, 3)
    assert arr.dtype == np.uint8 and not arr.flags.writeable
    assert path.parent == tmp_path / "cache" / dec.SUBDIR and path.suffix == ".npy"
    assert path == dec.decoded_path(data, tmp_path / "cache")
    assert np.array_equal(arr[4], dec.decode_one(data.image_paths[4], 16))
    # the key does not depend on the target/bias view: one file for every target
    other = _data(tmp_path / "celeba", target="Smiling", bias="Male")
    assert other.identity() != data.identity()
    assert dec.decoded_path(other, tmp_path / "cache") == path
    # ... but does on the image size
    assert dec.decoded_path(_data(tmp_path / "celeba", image_size=24), tmp_path / "cache") != path


def test_built_once_then_reused(tmp_path):
    data = _data(make_celeba(tmp_path / "celeba"))
    cache = tmp_path / "cache"
    make_torch_dataset(data, "train", train=True, cache_dir=cache)
    path = dec.decoded_path(data, cache)
    stamp = path.stat().st_mtime_ns
    assert dec.events() == {"built": 1}
    # the same process, a fresh view of the data, other splits: all reuse the file
    clear_cache()
    data2 = _data(tmp_path / "celeba", target="Smiling", bias="Male")
    for split in ("train", "val", "test"):
        make_torch_dataset(data2, split, train=split == "train", cache_dir=cache)
    assert dec.events() == {"built": 1, "reused": 3}
    assert path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()
                  if not p.name.endswith(".lock")) == sorted([path.name, f"{path.stem}.json"])


def test_concurrent_builders_build_once(tmp_path):
    """Two trials asking at the same time: the flock makes the second wait and reuse."""
    data = _data(make_celeba(tmp_path / "celeba"))
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def trial() -> None:
        try:
            start.wait()
            results.append(dec.decoded_array(data, tmp_path / "cache", progress=False)[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=trial) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert dec.events() == {"built": 1, "reused": 2}
    assert all(np.array_equal(r, results[0]) for r in results)


def test_half_written_temp_file_is_never_used(tmp_path, monkeypatch):
    data = _data(make_celeba(tmp_path / "celeba"))
    cache = tmp_path / "cache"
    path = dec.decoded_path(data, cache)

    # 1. a builder that dies half way leaves no finished file (and removes its temp file)
    real = dec.decode_one
    calls = {"n": 0}

    def dies_half_way(image_path, image_size):
        calls["n"] += 1
        if calls["n"] > len(data) // 2:
            raise KeyboardInterrupt("killed")
        return real(image_path, image_size)

    monkeypatch.setattr(dec, "decode_one", dies_half_way)
    monkeypatch.setattr(dec, "build_workers", lambda: 1)  # in this process, so the patch holds
    with pytest.raises(KeyboardInterrupt):
        make_torch_dataset(data, "test", train=False, cache_dir=cache)
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(dec, "decode_one", real)

    # 2. a temp file left by a SIGKILLed builder (no cleanup ran), with a valid .npy header
    #    and half the rows: never opened as the result, a whole file is built next to it
    size = dec.stored_size(data.image_size)
    stale = path.parent / f".{path.stem}.99999.abc.tmp"
    half = np.lib.format.open_memmap(stale, mode="w+", dtype=np.uint8,
                                     shape=(len(data), size, size, 3))
    half[: len(data) // 2] = 7
    del half
    ds = make_torch_dataset(data, "test", train=False, cache_dir=cache)
    assert dec.events() == {"built": 1}
    assert path.is_file() and stale.is_file()
    disk = make_torch_dataset(data, "test", train=False)
    assert all(torch.equal(ds[p][0], disk[p][0]) for p in range(len(ds)))

    # 3. a damaged finished file (truncated: a non-atomic copy, a full disk) is rebuilt
    dec._open.clear()
    with path.open("r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    make_torch_dataset(data, "test", train=False, cache_dir=cache)
    assert dec.events() == {"built": 2}
    arr, _ = dec.decoded_array(data, cache)
    assert arr.shape == (len(data), size, size, 3)


def test_train_items_deterministic_under_torch_seed(tmp_path):
    data = _data(make_celeba(tmp_path / "celeba"), image_size=16)
    ds = make_torch_dataset(data, "train", train=True, cache_dir=tmp_path / "cache")
    positions = list(range(len(ds)))

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        batch = ds.__getitems__(positions)
        assert [p for _, p in batch] == positions
        return torch.stack([x for x, _ in batch])

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (len(ds), 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # one draw from torch's generator per batch: item by item is another stream
    torch.manual_seed(0)
    assert not torch.equal(torch.stack([ds[p][0] for p in positions]), a)
    # augmented, not the eval crop, but the same normalisation (values in the same range)
    ev = make_torch_dataset(data, "train", train=False, cache_dir=tmp_path / "cache")
    plain = torch.stack([ev[p][0] for p in positions])
    assert not torch.equal(a, plain)
    assert abs(float(a.mean()) - float(plain.mean())) < 0.2
    # through a DataLoader with the engine's seeded shuffling, as a trial uses it
    def epoch() -> torch.Tensor:
        torch.manual_seed(5)
        order = torch.Generator().manual_seed(3)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=order)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(), epoch())


def test_dataloader_workers_and_pickling(tmp_path):
    """A DataLoader worker gets the path, not a copy of the array, and maps the file itself."""
    import pickle

    data = _data(make_celeba(tmp_path / "celeba"))
    ds = make_torch_dataset(data, "val", train=False, cache_dir=tmp_path / "cache")
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    clone = pickle.loads(blob)
    assert torch.equal(clone[1][0], ds[1][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs, torch.stack([ds[p][0] for p in range(len(ds))]))


def test_cache_dir_is_ignored_for_in_memory_data(tmp_path):
    data = load_grouped({"name": "synthetic", "image_size": 16}, "Odd", "Background")
    ds = make_torch_dataset(data, "test", train=True, cache_dir=tmp_path / "cache")
    assert not isinstance(ds, dec.DecodedGroupedDataset)
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="in memory"):
        dec.decoded_array(data, tmp_path / "cache")


def test_bad_image_names_the_file(tmp_path):
    from debias.data import DatasetError

    root = make_celeba(tmp_path / "celeba")
    data = _data(root)
    (root / "img_align_celeba" / "000003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"000003\.jpg"):
        make_torch_dataset(data, "train", train=True, cache_dir=tmp_path / "cache")
    assert not dec.decoded_path(data, tmp_path / "cache").exists()


def test_a_pool_of_processes_builds_the_same_array(tmp_path, monkeypatch):
    """Large datasets decode in a process pool (each worker writes its rows of the memmap);
    the result is the serial build's, byte for byte."""
    data = _data(make_celeba(tmp_path / "celeba"))
    serial, _ = dec.decoded_array(data, tmp_path / "serial", progress=False)
    monkeypatch.setattr(dec, "MIN_IMAGES_PER_PROCESS", 4)
    monkeypatch.setattr(dec, "build_workers", lambda: 2)
    pooled, _ = dec.decoded_array(data, tmp_path / "pooled", progress=False)
    assert np.array_equal(np.asarray(serial), np.asarray(pooled))
