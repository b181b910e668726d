"""The batched input pipeline (debias/data/augment.py, batches.py, pipeline.py): the batched
crop is torchvision's RandomResizedCrop + flip within interpolation error, batches follow
from (seed, epoch, batch) whatever serves them, and a resumed trial on an on-disk dataset
sees the batches an uninterrupted one does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from debias.data import clear_cache, load_grouped
from debias.data import decoded as dec
from debias.data.augment import CROP_RATIO, CROP_SCALE, BoxDraws, normalize, resized_crops
from debias.data.batches import BatchRequest, HostBatch, finish
from debias.data.pipeline import (
    FileSource,
    InputPipeline,
    epoch_requests,
    loader_workers,
)
from debias.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.test_decoded import make_celeba


@pytest.fixture(autouse=True)
def _fresh():
    clear_cache()
    yield
    clear_cache()


def _photos(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Textured uint8 images (smooth gradients plus noise), so resampling differences show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)],
                    -1)
    return np.stack([(base + rng.integers(0, 60, size=(height, width, 3))).clip(0, 255)
                     for _ in range(n)]).astype(np.uint8)


def _reference_box(draws: BoxDraws, i: int, height: int, width: int) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params, step by step, fed the same uniforms."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for t in range(draws.area.shape[1]):
        target_area = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0])
                              * draws.area[i, t])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws.log_ratio[i, t])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = math.floor(draws.top[i] * (height - h + 1))
            left = math.floor(draws.left[i] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        w, h = width, round(width / min(CROP_RATIO))
    elif in_ratio > max(CROP_RATIO):
        h, w = height, round(height * max(CROP_RATIO))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(("height", "width"), [(256, 256), (218, 178), (73, 73), (300, 40)])
def test_boxes_are_torchvisions_random_resized_crop(height: int, width: int) -> None:
    draws = BoxDraws.sample(7, 200)
    boxes = draws.boxes(height, width)
    for i in range(200):
        assert boxes.one(i)[:4] == _reference_box(draws, i, height, width), i
    assert 0.3 < boxes.flip.mean() < 0.7
    if (height, width) == (300, 40):  # no allowed ratio fits: torchvision's centre fallback
        assert {boxes.one(i)[:4] for i in range(200)} == {(123, 0, 53, 40)}
    else:
        fraction = boxes.height * boxes.width / (height * width)
        assert fraction.min() >= 0.68 and fraction.max() <= 1.0
    # per image sizes (the PIL path) give each image the box of its own size
    mixed = draws.boxes([height, 256] * 100, [width, 256] * 100)
    assert mixed.one(0) == boxes.one(0) and mixed.one(1) == draws.boxes(256, 256).one(1)


def test_same_seed_same_draws_other_seed_other_draws() -> None:
    a, b, c = (BoxDraws.sample(s, 64).boxes(256, 256) for s in (3, 3, 4))
    assert all(np.array_equal(getattr(a, f), getattr(b, f))
               for f in ("top", "left", "height", "width", "flip"))
    assert not np.array_equal(a.top, c.top)


def test_batched_crop_equals_per_item_pil_crop_within_interpolation_error() -> None:
    """Same boxes: the batched uint8 crop is PIL's resized_crop + hflip within a grey level
    or two (both antialiased bilinear; they round differently), and the float path (a GPU's)
    within one level of the uint8 one."""
    images = _photos(24, 73, 73)
    boxes = BoxDraws.sample(11, 24).boxes(73, 73)
    batched = resized_crops(torch.from_numpy(images), boxes, 64)
    assert batched.shape == (24, 3, 64, 64) and batched.dtype == torch.uint8
    for i in range(24):
        top, left, h, w, flip = boxes.one(i)
        pil = TF.resized_crop(Image.fromarray(images[i]), top, left, h, w, [64, 64])
        pil = np.asarray(TF.hflip(pil) if flip else pil).astype(np.int16)
        ours = batched[i].permute(1, 2, 0).numpy().astype(np.int16)
        diff = np.abs(ours - pil)
        assert diff.max() <= 2, (i, diff.max())
        assert diff.mean() < 0.5, (i, diff.mean())
    floats = resized_crops(torch.from_numpy(images), boxes, 64, uint8=False)
    assert floats.dtype == torch.float32
    assert float((floats - batched.float()).abs().max()) <= 1.01


def test_normalize_is_totensor_then_normalize_bit_for_bit() -> None:
    images = _photos(3, 20, 20)
    ours = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    theirs = torch.stack([TF.normalize(TF.to_tensor(Image.fromarray(x)), IMAGENET_MEAN,
                                       IMAGENET_STD) for x in images])
    assert torch.equal(ours, theirs)
    assert normalize(torch.from_numpy(images).permute(0, 3, 1, 2),
                     torch.channels_last).is_contiguous(memory_format=torch.channels_last)


def _decoded(tmp_path: Path, image_size: int = 16):
    root = make_celeba(tmp_path / "celeba")
    return load_grouped({"name": "celeba", "root": str(root), "image_size": image_size},
                        "Smiling", "Male")


def test_a_decoded_training_batch_is_the_per_item_crop_of_the_stored_squares(tmp_path):
    """What a trial trains on: the stored squares gathered, then cropped and normalised on
    the device with the batch's boxes; the per-item reference (PIL crop of each stored
    square, ToTensor, Normalize) agrees within interpolation error."""
    data = _decoded(tmp_path)
    pipe = InputPipeline(data, cache_dir=tmp_path / "cache", augment=True, seed=5)
    order = np.array([5, 0, 3, 1, 4, 2])
    (images, positions), = list(pipe.epoch(order, 8, epoch=2))
    assert positions.tolist() == [0, 1, 2, 3, 4, 5]  # one sorted gather
    request = epoch_requests(order, 8, 5, 2, augment=True)[0]
    array, _ = dec.decoded_array(data, tmp_path / "cache")
    rows = data.view("train").index[request.positions]
    size = dec.stored_size(16)
    boxes = BoxDraws.sample(request.seed, len(rows)).boxes(size, size)
    for i, row in enumerate(rows):
        top, left, h, w, flip = boxes.one(i)
        crop = TF.resized_crop(Image.fromarray(array[row]), top, left, h, w, [16, 16])
        ref = TF.normalize(TF.to_tensor(TF.hflip(crop) if flip else crop), IMAGENET_MEAN,
                           IMAGENET_STD)
        assert float((images[i] - ref).abs().max()) <= 2.5 / 255 / min(IMAGENET_STD), i


def test_evaluation_batches_are_the_eval_transform_exactly(tmp_path):
    data = _decoded(tmp_path)
    decoded = InputPipeline(data, cache_dir=tmp_path / "cache")
    files = InputPipeline(data)  # cache.decoded: off
    from debias.data.torch_data import OnDiskGroupedDataset

    per_item = OnDiskGroupedDataset(data, "val", train=False)
    expected = torch.stack([per_item[p][0] for p in range(len(per_item))])
    for pipe in (decoded, files):
        got = torch.cat([x for x, _ in pipe.split("val", 2)])
        assert torch.equal(got, expected)


def _epochs(pipe: InputPipeline, epochs: range) -> list[torch.Tensor]:
    order = np.random.default_rng(0).permutation(len(pipe.data.view("train")))
    return [torch.cat([x for x, _ in pipe.epoch(order, 4, e)]) for e in epochs]


@pytest.mark.parametrize("cached", [True, False], ids=["decoded", "files"])
def test_batches_follow_the_seed_and_epoch_not_the_workers_or_history(tmp_path, cached):
    """Same seed: the same batches with 0 or 2 workers (crops then in the workers) and for a
    fresh pipeline asked for epoch 2 only (a resumed trial); other epochs and seeds differ."""
    data = _decoded(tmp_path)
    cache = tmp_path / "cache" if cached else None

    def pipe(**kw) -> InputPipeline:
        return InputPipeline(data, cache_dir=cache, augment=True, **kw)

    straight = _epochs(pipe(seed=1), range(3))
    workers = pipe(seed=1, workers=2)
    assert workers.finish_here  # a CPU trial's feeders crop too
    assert workers.processes == (not cached)  # threads gather, processes decode JPEGs
    with_workers = _epochs(workers, range(3))
    workers.close()
    for a, b in zip(straight, with_workers, strict=True):
        assert torch.equal(a, b)
    # as a GPU trial's feeders: they only gather, the trial's device crops
    gather_only = pipe(seed=1, workers=2, crop_in_feeders=False)
    stages = {b.stage for b in gather_only.host_batches(epoch_requests(
        np.arange(len(data.view("train"))), 4, 1, 0, augment=True))}
    assert stages == ({"squares"} if cached else {"crops"})
    assert all(torch.equal(a, b) for a, b in zip(straight, _epochs(gather_only, range(3)),
                                                 strict=True))
    gather_only.close()
    assert torch.equal(_epochs(pipe(seed=1), range(2, 3))[0], straight[2])
    assert not torch.equal(straight[0], straight[1])
    assert not torch.equal(_epochs(pipe(seed=2), range(1))[0], straight[0])
    # and the evaluation pass is the same through the workers too
    assert torch.equal(torch.cat([x for x, _ in pipe(seed=1, workers=1).split("test", 2)]),
                       torch.cat([x for x, _ in pipe(seed=1).split("test", 2)]))


def test_a_source_returns_what_the_device_still_has_to_do(tmp_path):
    data = _decoded(tmp_path)
    source = dec.DecodedSource(data, tmp_path / "cache")
    train = source.fetch(BatchRequest("train", np.array([0, 2]), seed=3))
    assert train.stage == "squares" and train.images.shape == (2, 18, 18, 3)
    assert train.images.dtype == torch.uint8  # uint8 crosses to the device, 4x less
    val = source.fetch(BatchRequest("val", np.array([1])))
    assert val.stage == "crops" and val.images.shape == (1, 16, 16, 3)
    files = FileSource(data).fetch(BatchRequest("train", np.array([0, 2]), seed=3))
    assert files.stage == "crops" and files.images.shape == (2, 16, 16, 3)
    out = finish(train, 16, torch.device("cpu"), torch.channels_last)
    assert out.shape == (2, 3, 16, 16) and out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="seed"):
        HostBatch(train.images, train.positions, "squares")


def test_in_memory_data_is_sliced_never_augmented() -> None:
    data = load_grouped({"name": "synthetic", "image_size": 16, "size": 200}, "Odd",
                        "Background")
    pipe = InputPipeline(data, augment=True, seed=0)
    order = np.arange(len(data.view("train")))[::-1]

    def by_position(batches) -> torch.Tensor:
        images, positions = zip(*batches, strict=True)
        return torch.cat(images)[torch.cat(positions).argsort()]

    a, b = by_position(pipe.epoch(order, 32, 0)), by_position(pipe.epoch(order, 32, 1))
    assert torch.equal(a, b)  # no crops: the same images every epoch
    assert torch.equal(a, torch.cat([x for x, _ in pipe.split("train", 32)]))


def test_workers_follow_the_trials_cpus_unless_set() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loader_workers("auto", gpu, 2, in_memory=False) == 2
    assert loader_workers("auto", cpu, 2, in_memory=False) == 1
    assert loader_workers("auto", cpu, 1, in_memory=False) == 0
    assert loader_workers("auto", gpu, 4, in_memory=True) == 0
    assert loader_workers(3, cpu, 1, in_memory=True) == 3


def test_num_workers_is_validated() -> None:
    from debias.spec import SpecError, validate

    base = {"name": "x", "targets": ["Odd"], "bias_attribute": "Background",
            "dataset": {"name": "synthetic"}}
    assert validate(base).config["train"]["num_workers"] == "auto"
    for bad in (-1, 65, "four", True, 2.5):
        with pytest.raises(SpecError, match=r"train\.num_workers: got .*'auto' or an integer"):
            validate({**base, "train": {"num_workers": bad}})


@pytest.fixture
def disk_config(tmp_path: Path) -> dict:
    """A trial config on a tiny on-disk CelebA (small_cnn, 16 px, augmented, one worker)."""
    from debias.spec import validate

    root = make_celeba(tmp_path / "celeba")
    spec = validate({
        "name": "disk", "method": "erm", "targets": ["Smiling"], "bias_attribute": "Male",
        "dataset": {"name": "celeba", "root": str(root), "image_size": 16},
        "backbone": {"arch": "small_cnn", "weights": "none"},
        "train": {"epochs": 3, "batch_size": 4, "lr": 0.05, "augment": "on",
                  "num_workers": 1},
        "storage": str(tmp_path / "results")}, cwd=tmp_path)
    return spec.trial_base("Smiling")


def test_a_resumed_trial_on_disk_data_sees_the_uninterrupted_batches(disk_config, tmp_path):
    from debias.trainable import build_trial

    def numbers(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if not k.startswith("perf/")}

    torch.set_num_threads(1)
    straight = [numbers(m) for m in build_trial(disk_config, "cpu").epochs()]
    again = [numbers(m) for m in build_trial(disk_config, "cpu").epochs()]
    assert straight == again
    trainer = build_trial(disk_config, "cpu")
    first = next(trainer.epochs())
    assert first["perf/train_images_per_s"] > 0 and 0 <= first["perf/data_wait_frac"] <= 1
    trainer.save(tmp_path / "state.pt")
    resumed = build_trial(disk_config, "cpu")
    resumed.load(tmp_path / "state.pt")
    assert [numbers(first), *(numbers(m) for m in resumed.epochs())] == straight


def test_the_report_names_starved_trials(tmp_path) -> None:
    """A trial that waited for batches more than a third of its training time is named in the
    report's notes; one that did not, and a run without the metric, are not."""
    from mlflow.tracking import MlflowClient

    from debias.report import starved_notes
    from debias.tracking import ROLE_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("starved")
    parent = client.create_run(experiment, run_name="Object", tags={ROLE_TAG: "parent"})
    for name, wait in (("search-a", 0.62), ("search-b", 0.05), ("seeds-c", None)):
        run = client.create_run(experiment, run_name=name,
                                tags={"mlflow.parentRunId": parent.info.run_id})
        if wait is not None:
            client.log_metric(run.info.run_id, "perf/data_wait_frac", wait)
    notes = starved_notes(Tracker(uri, "starved", create=False))
    assert len(notes) == 1 and "1 trial(s)" in notes[0]
    assert "Object search-a (62%)" in notes[0] and "search-b" not in notes[0]
    client.log_metric(client.search_runs([experiment], "attributes.run_name = 'search-a'")[0]
                      .info.run_id, "perf/data_wait_frac", 0.2)
    assert starved_notes(Tracker(uri, "starved", create=False)) == []
