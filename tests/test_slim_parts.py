"""SLIM's parts on hand-made inputs, and its data pipeline on the embedded synthetic set."""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from debias.cache import StageCache
from debias.slim.aiou import aiou, aiou_batch, soft_iou, soft_iou_batch
from debias.slim.annotations import (
    COLUMNS,
    AnnotationError,
    group_annotator,
    read_annotations,
    simulated_annotator,
    write_annotation_request,
)
from debias.slim.attention import attention_vectors, gradcam_images, lowres_cam, overlay_png
from debias.slim.curation import allocate, curate, elbow_k
from debias.slim.propagation import keep_above_quantile, propagate
from debias.slim.sampling import sample_for_annotation
from debias.slim.space import embed_2d, embed_per_class

CAM = np.array([[0.0, 1.0], [2.0, 4.0]])  # min-max normalised: [[0, .25], [.5, 1]]
DIAGONAL = np.array([[0, 1], [1, 0]], dtype=bool)
BOTTOM = np.array([[0, 0], [1, 1]], dtype=bool)


# ---------------------------------------------------------------- AIOU and soft IoU
def test_aiou_hand_computed() -> None:
    # delta .4: high attention .5 + 1 = 1.5, of which .5 lies inside the diagonal mask.
    assert aiou(CAM, DIAGONAL, delta=0.4) == pytest.approx(1 / 3)
    # delta .8: only the 1.0 pixel is high, and it is outside the mask.
    assert aiou(CAM, DIAGONAL, delta=0.8) == 0.0
    assert aiou(CAM, BOTTOM, delta=0.8) == 1.0
    assert aiou(CAM, BOTTOM, delta=0.4) == 1.0


def test_soft_iou_hand_computed() -> None:
    # min(M, A) = [[0, .25], [.5, 0]] -> .75; max(M, A) = [[0, 1], [1, 1]] -> 3.
    assert soft_iou(CAM, DIAGONAL) == pytest.approx(0.25)
    # min = [[0, 0], [.5, 1]] -> 1.5; max = [[0, .25], [1, 1]] -> 2.25.
    assert soft_iou(CAM, BOTTOM) == pytest.approx(2 / 3)


def test_aiou_does_not_modify_inputs_and_batches_agree() -> None:
    cams = np.stack([CAM, 3.0 * CAM + 1.0])
    masks = np.stack([DIAGONAL, BOTTOM])
    before = cams.copy()
    a = aiou_batch(cams, masks, delta=0.4)
    s = soft_iou_batch(cams, masks)
    np.testing.assert_array_equal(cams, before)
    # Scaling and shifting a CAM changes nothing after min-max normalisation.
    assert a.tolist() == pytest.approx([1 / 3, 1.0])
    assert s.tolist() == pytest.approx([0.25, 2 / 3])
    # The two scores in either order give the same values (no in-place normalisation).
    assert soft_iou(cams[0], masks[0]) == pytest.approx(s[0])
    assert aiou(cams[0], masks[0], 0.4) == pytest.approx(a[0])
    np.testing.assert_array_equal(cams, before)


def test_flat_cams_score_zero_not_nan() -> None:
    flat = np.zeros((2, 2))
    assert aiou(flat, DIAGONAL) == 0.0
    assert soft_iou(flat, DIAGONAL) == 0.0
    assert soft_iou(flat, np.zeros((2, 2))) == 0.0
    assert aiou(np.full((2, 2), 7.0), BOTTOM) == 0.0


def test_low_res_cam_is_resized_to_the_mask() -> None:
    cam = np.array([[0.0, 0.0], [0.0, 1.0]])
    mask = np.zeros((8, 8), dtype=bool)
    mask[4:, 4:] = True
    assert aiou(cam, mask) == 1.0


# ---------------------------------------------------------------- attention
def test_attention_vectors_hand_computed() -> None:
    acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    s = torch.tensor([[[0.0, 1.0], [2.0, 1.0]]])  # minmax: [[0, .5], [1, .5]]
    v, v_bar = attention_vectors(acts, s)
    assert v.tolist() == [[12.0, 2.0]]  # 2*1 + 3*2 + 4*1, 1 + 1
    assert v_bar.tolist() == [[4.0, 1.0]]  # 1*1 + 2*.5 + 4*.5, .5 + .5
    before = s.clone()
    attention_vectors(acts, s)
    assert torch.equal(s, before)
    # Gradient weights (1, -2): ReLU(A0 - 2 A1) = ReLU([[1, 0], [3, 2]]).
    grads = torch.stack([torch.ones(2, 2), torch.full((2, 2), -2.0)])[None]
    assert lowres_cam(acts, grads).tolist() == [[[1.0, 0.0], [3.0, 2.0]]]


def test_lowres_cam_matches_grad_cams_image_map(tmp_path: Path) -> None:
    from pytorch_grad_cam.utils.image import scale_cam_image

    from debias.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("small_cnn", "none", {"target": 2})
    images = torch.randn(3, 3, 16, 16)
    out = gradcam_images(model, images, [0, 1, 1])
    assert out["cam"].shape == (3, 16, 16) and out["cam_lowres"].shape == (3, 4, 4)
    assert out["v"].shape == out["v_bar"].shape == (3, model.feature_dim)
    # grad-cam min-max scales, resizes, then min-max scales again after merging layers.
    expected = scale_cam_image(scale_cam_image(out["cam_lowres"].numpy(), (16, 16)))
    np.testing.assert_allclose(out["cam"].numpy(), expected, atol=1e-4)
    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    path = overlay_png(image, out["cam"][0].numpy(), tmp_path / "o.png")
    assert path.is_file() and path.stat().st_size > 0


# ---------------------------------------------------------------- space and sampling
def _blobs(n_per: int, centres: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(c, 0.3, size=(n_per, 2)) for c in centres])


def test_embedding_is_standardised_and_umap_missing_is_explained(monkeypatch) -> None:
    x = np.random.default_rng(0).normal(size=(40, 6))
    e = embed_2d(x, "pca")
    assert e.shape == (40, 2)
    np.testing.assert_allclose(e.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(e.std(0), 1, atol=1e-9)
    y = np.repeat([0, 1], 20)
    assert embed_per_class(x, y).shape == (40, 2)
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ImportError, match="umap-learn"):
        embed_2d(x, "umap")


def test_sampling_budget_unique_deterministic() -> None:
    e = _blobs(30, [(0, 0), (5, 5), (0, 5), (5, 0)])
    y = np.repeat([0, 1], 60)
    first = sample_for_annotation(e, y, 7, neighbours=5, seed=3)
    assert len(first) == 14 and len(set(first.tolist())) == 14
    assert (y[first] == 0).sum() == 7 and (y[first] == 1).sum() == 7
    np.testing.assert_array_equal(first, sample_for_annotation(e, y, 7, neighbours=5, seed=3))
    # A budget above a class's size takes the whole class, still without duplicates.
    small = sample_for_annotation(e[:10], np.zeros(10, dtype=int), 50, seed=0)
    assert sorted(small.tolist()) == list(range(10))


# ---------------------------------------------------------------- propagation
def test_propagation_separates_two_blobs() -> None:
    e = _blobs(50, [(-3, -3), (3, 3)])
    y = np.zeros(100, dtype=int)
    annotated = np.array([0, 1, 2, 50, 51, 52, 53])
    labels = np.array([1, 1, 1, 0, 0, 0, -1])  # the unsure answer is ignored
    result = propagate(e, y, annotated, labels, gamma=10.0)
    assert result.scores[:50].min() > result.scores[50:].max()
    np.testing.assert_array_equal(result.keep, np.arange(100) < 50)
    assert result.scores.min() == 0.0 and result.scores.max() == 1.0


def test_propagation_with_one_label_or_none() -> None:
    """The reference's rule: a class whose answers lack a 0 or a 1 scores 1 everywhere (no
    contrast to spread, nothing dropped)."""
    e = _blobs(50, [(-3, -3), (3, 3)])
    y = np.repeat([0, 1], 50)
    both = np.array([50, 51, 52, 75, 76])
    answers = np.array([1, 1, 0, 0, 0])
    for labels in (np.array([1, 1]), np.array([0, 0]), np.array([-1, -1])):
        result = propagate(e, y, np.concatenate([[0, 1], both]),
                           np.concatenate([labels, answers]), gamma=[10.0, 5.0])
        assert (result.scores[:50] == 1.0).all() and result.keep[:50].all()
        assert "every score 1" in result.notes[0] and "spreading" in result.notes[1]
        # the global median cut falls inside class 1, which is cut by its scores
        assert 0 < result.keep[50:].sum() < 50
    # Ties at the median: strict "above" would keep nothing, so the ties are kept.
    assert keep_above_quantile(np.array([0.0, 1.0, 1.0, 1.0]), 0.5).tolist() == [
        False, True, True, True]


# ---------------------------------------------------------------- curation
def test_allocation_is_exact_and_capped() -> None:
    # quotas 2.1, 3.5, 1.4 -> floors 2, 3, 1 and the one left goes to the largest remainder.
    assert allocate(np.array([0.3, 0.5, 0.2]), 7).tolist() == [2, 4, 1]
    # A full cell passes its excess on.
    assert allocate(np.array([10.0, 1.0, 1.0]), 7, np.array([1, 10, 10])).tolist() == [1, 3, 3]
    assert allocate(np.array([0.0, 0.0]), 3).tolist() == [2, 1]
    assert allocate(np.array([1.0, 1.0]), 50, np.array([3, 4])).tolist() == [3, 4]
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.random(9) * (rng.random(9) > 0.3)
        cap = rng.integers(0, 12, size=9)
        total = int(rng.integers(0, 60))
        got = allocate(w, total, cap)
        assert got.sum() == min(total, cap.sum()) and (got <= cap).all() and (got >= 0).all()


def test_elbow_finds_three_blobs() -> None:
    assert elbow_k(_blobs(40, [(0, 0), (10, 0), (0, 10)]), (2, 5), seed=0) == 3


def test_curation_budget_balanced_deterministic() -> None:
    e = _blobs(40, [(0, 0), (6, 0), (0, 6), (6, 6)], seed=1)
    e_bar = _blobs(40, [(0, 0), (0, 6), (6, 0), (6, 6)], seed=2)
    y = np.repeat([0, 1], 80)
    candidates = np.arange(0, 160, 2)
    cur = curate(e, e_bar, y, candidates, 30, seed=5)
    assert len(cur.positions) == 30 and len(set(cur.positions.tolist())) == 30
    assert set(cur.positions.tolist()) <= set(candidates.tolist())
    assert (y[cur.positions] == 0).sum() == 15
    again = curate(e, e_bar, y, candidates, 30, seed=5)
    np.testing.assert_array_equal(cur.positions, again.positions)
    for d in cur.details.values():
        assert sum(d["allocation"]) == 15  # type: ignore[arg-type]
    # More requested than kept: everything kept, nothing invented.
    assert len(curate(e, e_bar, y, candidates[:10], 30).positions) == 10


# ---------------------------------------------------------------- annotations
def _request(path: Path, ids: list[str]) -> Path:
    rows = [{"id": i, "split": "train", "position": n, "label_class": n % 2,
             "image_path": f"{i}.png", "overlay_path": f"{i}_overlay.png"}
            for n, i in enumerate(ids)]
    return write_annotation_request(path, rows)


def _fill(path: Path, answers: list[str], header: list[str] | None = None) -> None:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = header or list(COLUMNS)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for row, answer in zip(rows, answers, strict=False):
            writer.writerow({**row, "annotation": answer})


def test_annotation_round_trip(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    path = _request(tmp_path / "ann.csv", ids)
    with path.open() as handle:
        assert next(csv.reader(handle)) == list(COLUMNS)
    _fill(path, ["1", " 0 ", "-1"])
    assert read_annotations(path, ids) == {"a": 1, "b": 0, "c": -1}


def test_one_file_answers_each_split_on_its_own(tmp_path: Path) -> None:
    path = _request(tmp_path / "ann.csv", ["a", "b", "c"])
    _fill(path, ["1", "0", "-1"])
    path.write_text(path.read_text().replace("c,train,", "c,val,"))
    # The training rows are read as the training split's; the validation row is not theirs.
    assert read_annotations(path, ["a", "b"], split="train") == {"a": 1, "b": 0}
    assert read_annotations(path, ["c"], split="val") == {"c": -1}
    with pytest.raises(AnnotationError, match=r"line 2: unknown id 'a'"):
        read_annotations(path, ["c"])  # without a split, every row must be requested
    path.write_text(path.read_text().replace("c,val,", "c,vall,"))
    with pytest.raises(AnnotationError, match=r"line 4: split 'vall'; allowed values are "
                                              r"train, val, test"):
        read_annotations(path, ["a", "b"], split="train")


@pytest.mark.parametrize(("edit", "pattern"), [
    ("unknown", r"ann\.csv, line 3: unknown id 'zz'"),
    ("bad", r"ann\.csv, line 4: id 'c' has annotation '2'; allowed values are 1"),
    ("empty", r"ann\.csv, line 2: id 'a' has no annotation"),
    ("column", r"ann\.csv, line 1: missing column 'annotation'"),
    ("duplicate", r"ann\.csv, line 4: duplicate id 'a' \(first on line 2\)"),
    ("absent", r"ann\.csv: 1 requested id\(s\) have no row: 'c'"),
    ("missing", r"annotation file .*nope\.csv does not exist"),
])
def test_bad_annotation_files_are_rejected(tmp_path: Path, edit: str, pattern: str) -> None:
    ids = ["a", "b", "c"]
    path = _request(tmp_path / "ann.csv", ids)
    if edit == "missing":
        path = tmp_path / "nope.csv"
    elif edit == "column":
        _fill(path, ["1", "0", "1"], header=[c for c in COLUMNS if c != "annotation"])
    elif edit == "absent":
        _fill(path, ["1", "0"])
        path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    else:
        _fill(path, {"bad": ["1", "0", "2"], "empty": ["", "0", "1"]}.get(edit, ["1", "0", "1"]))
        text = path.read_text()
        if edit == "unknown":
            text = text.replace("\nb,", "\nzz,")
        if edit == "duplicate":
            text = text.replace("\nc,", "\na,")
        path.write_text(text)
    with pytest.raises(AnnotationError, match=pattern):
        read_annotations(path, ids)


def test_simulated_and_group_annotators() -> None:
    assert simulated_annotator(np.array([0.1, 0.3, 0.9]), 0.3).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="no foreground masks"):
        simulated_annotator(np.array([0.5, math.nan]), 0.3)
    y = np.array([0, 0, 0, 1, 1, 1])
    a = np.array([0, 0, 1, 1, 1, 0])  # majority bias: 0 for class 0, 1 for class 1
    assert group_annotator(y, a).tolist() == [0, 0, 1, 0, 0, 1]
    assert group_annotator(y, a, np.array([5, 2])).tolist() == [1, 1]


# ---------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def trained():
    from debias.data import load_grouped, make_torch_dataset
    from debias.models import build_classifier

    data = load_grouped({"name": "synthetic", "image_size": 16, "size": 1500}, "Odd",
                        "Background")
    torch.manual_seed(0)
    model = build_classifier("small_cnn", "none", {"target": 2})
    dataset = make_torch_dataset(data, "train", train=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True)
    y = torch.from_numpy(np.array(data.view("train").y))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step, (images, positions) in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(model(images), y[positions])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 5:
            break
    return data, model.eval()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> StageCache:
    """One cache for the pipeline tests, so GradCAM of the same model is computed once."""
    return StageCache(tmp_path_factory.mktemp("slim-cache"))


def test_pipeline_reuses_gradcam_and_annotates_little(trained, shared_cache) -> None:
    from debias.methods.slim import SLIMParams
    from debias.slim.pipeline import curated_subset

    data, model = trained
    first = curated_subset(SLIMParams(curated_size=60, budget_per_class=10, embedding="pca"),
                           data, model,
                           shared_cache, "cpu", "ref-a")
    StageCache.reset_events()
    second = curated_subset(SLIMParams(curated_size=40, budget_per_class=10, embedding="pca"),
                           data, model,
                            shared_cache, "cpu", "ref-a")
    # Only the curation is redone for another curated_size; GradCAM and the 2-D embeddings
    # come from the cache.
    assert dict(StageCache.computed) == {"curation": 1}
    assert dict(StageCache.reused) == {"gradcam": 1, "space": 1}
    n_train = len(data.view("train"))
    for out, size in ((first, 60), (second, 40)):
        pos = out["positions"]
        # the reference's int(total x weight) per cell: at most one short per cell
        assert pos.dtype == torch.long and size - 25 <= len(pos) <= size
        assert 0 <= int(pos.min()) < int(pos.max()) < n_train
        assert out["annotated"] == 20 and out["annotated_fraction"] < 0.03
        assert out["annotated_fraction"] == pytest.approx(20 / n_train)
        assert 0.0 <= out["aiou_mean"] <= 1.0
        assert out["annotator"] == "simulated-aiou" and out["simulated"]
        assert size <= out["propagated_kept"] < n_train
    # Same knobs again: nothing recomputed.
    StageCache.reset_events()
    again = curated_subset(SLIMParams(curated_size=60, budget_per_class=10, embedding="pca"),
                           data, model,
                           shared_cache, "cpu", "ref-a")
    assert torch.equal(again["positions"], first["positions"])
    assert StageCache.computed == {} and StageCache.reused["curation"] == 1


def test_pipeline_without_masks_uses_group_annotator(trained, tmp_path: Path) -> None:
    from debias.methods.slim import SLIMParams
    from debias.slim.pipeline import curated_subset

    data, model = trained
    no_masks = dataclasses.replace(data, masks=None, source=data.source + "|no-masks")
    out = curated_subset(SLIMParams(curated_size=30, embedding="pca"), no_masks, model,
                         StageCache(tmp_path),
                         "cpu", oracle=lambda split: np.asarray(no_masks.view(split).a))
    assert math.isnan(out["aiou_mean"]) and out["annotator"] == "simulated-group"
    assert 5 <= len(out["positions"]) <= 30


def test_pipeline_csv_request_then_answers(trained, shared_cache, tmp_path: Path) -> None:
    from debias.methods.slim import SLIMParams
    from debias.slim.pipeline import curated_subset, request_rows

    data, model = trained
    path = tmp_path / "people" / "answers.csv"
    config = SLIMParams(annotator="csv", annotations=str(path), budget_per_class=3,
                        curated_size=20, embedding="pca")
    cache = shared_cache
    with pytest.raises(AnnotationError, match=r"answers\.csv does not exist: build the "
                                              r"request with .*--annotate"):
        curated_subset(config, data, model, cache, "cpu", "ref-a")
    write_annotation_request(path, request_rows(config, data, model, cache, "cpu", "ref-a",
                                                path))
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and all(r["annotation"] == "" and r["split"] == "train" for r in rows)
    assert all(Path(r["overlay_path"]).is_file() and Path(r["image_path"]).is_file()
               for r in rows)
    _fill(path, ["1", "0", "-1", "1", "0", "1"])
    out = curated_subset(config, data, model, cache, "cpu", "ref-a")
    assert out["annotator"] == "csv" and not out["simulated"] and out["unsure"] == 1
    assert 10 <= len(out["positions"]) <= 20
