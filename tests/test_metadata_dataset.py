"""`dataset: {name: metadata}`: any dataset described by one CSV; its bad inputs named with
file and line before any trial; and the writer of the embedded benchmark in the published
layouts (`launch.py --write-dataset`), whose files the real loaders read back."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from debias.data import DatasetError, clear_cache, load_grouped
from debias.data.export_layouts import write_dataset
from debias.data.metadata import encode
from debias.spec import SpecError, validate
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _fresh():
    clear_cache()
    yield
    clear_cache()


HEADER = ["file", "part", "species", "habitat", "note"]
#: 3 species x 2 habitats, 2 images per group in each split.
ROWS = [[f"img/{split}_{s}_{h}_{i}.png", split, s, h, "x"]
        for split in ("tr", "va", "te") for s in ("owl", "gull", "wren")
        for h in ("land", "water") for i in range(2)]


def make_csv(root: Path, rows=ROWS, header=HEADER, images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "meta.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    if images:
        rng = np.random.default_rng(0)
        for row in rows:
            path = root / row[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path)
    return root


def cfg(root: Path, **kw) -> dict:
    return {"name": "metadata", "root": str(root), "file": "meta.csv", "path_column": "file",
            "split_column": "part", "splits": {"train": "tr", "val": "va", "test": "te"},
            "image_size": 16, **kw}


def test_a_categorical_target_and_bias_from_a_csv(tmp_path: Path) -> None:
    data = load_grouped(cfg(make_csv(tmp_path / "d")), "species", "habitat")
    assert data.n_classes == 3 and data.n_bias == 2
    assert data.class_names == ("gull", "owl", "wren") and data.bias_names == ("land", "water")
    for split in ("train", "val", "test"):
        assert (data.group_counts(split) == 2).all()
    view = data.view("val")
    assert (view.group == view.y * 2 + view.a).all() and view.group.max() == 5
    assert data.ids[0] == "img/tr_owl_land_0.png"
    # the same file read with other columns is another dataset (another cache identity)
    other = load_grouped(cfg(make_csv(tmp_path / "d")), "habitat", "species")
    assert other.identity() != data.identity()


def test_values_become_classes() -> None:
    assert encode(["1", "-1", "1"])[0].tolist() == [1, 0, 1]
    assert encode(["True", "false"])[0].tolist() == [1, 0]
    assert encode(["no", "yes"])[1] == ("no", "yes")
    codes, names = encode(["10", "9", "100", "9"])
    assert names == ("9", "10", "100") and codes.tolist() == [1, 0, 2, 0]


def test_a_metadata_trial_trains_and_scores_every_group(tmp_path: Path) -> None:
    from debias.trainable import build_trial

    root = make_csv(tmp_path / "d")
    spec = validate({"name": "m", "targets": ["species"], "bias_attribute": "habitat",
                     "dataset": cfg(root), "backbone": {"arch": "small_cnn", "weights": "none"},
                     "train": {"epochs": 1, "batch_size": 4},
                     "storage": str(tmp_path / "results")}, cwd=tmp_path)
    metrics = list(build_trial(spec.trial_base("species"), "cpu").epochs())[-1]
    assert {f"val/group_acc/{y}_{a}" for y in range(3) for a in range(2)} <= set(metrics)
    assert metrics["perf/train_images_per_s"] > 0


def _error(tmp_path: Path, rows=ROWS, header=HEADER, target="species", bias="habitat",
           images: bool = True, **kw) -> str:
    root = make_csv(tmp_path / "bad", rows, header, images)
    with pytest.raises(DatasetError) as info:
        load_grouped(cfg(root, **kw), target, bias)
    return str(info.value)


def test_bad_inputs_are_named_with_file_and_line(tmp_path: Path) -> None:
    meta = r"/bad/meta\.csv"  # the file, by its full path
    unknown_split = [*ROWS[:3], [ROWS[3][0], "holdout", "owl", "land", ""], *ROWS[4:]]
    assert re.search(meta + r" line 5: column 'part' has value 'holdout'; expected one of "
                     r"'tr' \(train\), 'va' \(val\), 'te' \(test\)",
                     _error(tmp_path / "1", unknown_split))
    empty = [*ROWS[:6], [ROWS[6][0], "tr", "", "land", ""], *ROWS[7:]]
    assert re.search(meta + r" line 8: column 'species' is empty", _error(tmp_path / "2", empty))
    twice = [*ROWS, ROWS[1]]
    assert re.search(meta + r" line 38: the image 'img/tr_owl_land_1.png' is listed again "
                     r"\(first on line 3\)", _error(tmp_path / "3", twice))
    no_group = [r for r in ROWS if not (r[1] == "va" and r[2] == "wren" and r[3] == "water")]
    assert re.search(meta + r": the val split has no image of group\(s\) species=wren, "
                     "habitat=water", _error(tmp_path / "4", no_group))
    assert re.search(meta + r" line 1: no column 'file'", _error(
        tmp_path / "5", [r[1:] for r in ROWS], HEADER[1:], images=False))
    assert "no column 'colour' (the target)" in _error(tmp_path / "6", target="colour")
    one_class = [[*r[:2], "owl", *r[3:]] for r in ROWS]
    assert "has one value only ('owl')" in _error(tmp_path / "7", one_class, images=False)


def test_missing_and_unreadable_images_are_named_with_their_line(tmp_path: Path) -> None:
    root = make_csv(tmp_path / "d")
    (root / ROWS[4][0]).unlink()
    (root / ROWS[9][0]).write_bytes(b"not an image")
    with pytest.raises(DatasetError) as info:
        load_grouped(cfg(root), "species", "habitat")
    text = str(info.value)
    assert "2 of 36 images listed in" in text
    assert re.search(r"line 6: \S+tr_gull_land_0\.png does not exist", text)
    assert re.search(r"line 11: \S+tr_wren_land_1\.png is not an image PIL can read", text)


def test_the_sweep_file_is_checked_against_the_csv_header(tmp_path: Path) -> None:
    root = make_csv(tmp_path / "d", images=False)
    base = {"name": "m", "targets": ["specie"], "bias_attribute": "habitat",
            "dataset": cfg(root), "storage": str(tmp_path / "r")}
    with pytest.raises(SpecError, match=r"targets\[0\]: got 'specie'; expected an attribute "
                                        r"of metadata \(did you mean 'species'\?\)"):
        validate(base, cwd=tmp_path)
    with pytest.raises(SpecError, match=r"dataset.file: metadata: \S+nothere.csv not found"):
        validate({**base, "dataset": {**cfg(root), "file": "nothere.csv"}}, cwd=tmp_path)
    with pytest.raises(SpecError, match=r"dataset.path_column: got 'file'; only a metadata "
                                        r"dataset"):
        validate({**base, "dataset": {"name": "synthetic", "path_column": "file"}})
    # split values may be numbers in YAML (Waterbirds' 0/1/2); they are the CSV's text
    spec = validate({**base, "targets": ["species"],
                     "dataset": {**cfg(root), "splits": {"train": 0, "val": 1, "test": 2}}},
                    cwd=tmp_path)
    assert spec.config["dataset"]["splits"] == {"train": "0", "val": "1", "test": "2"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("layouts")
    return {layout: write_dataset(layout, tmp / layout, images=60, size=(24, 28))
            for layout in ("waterbirds", "celeba", "celeba-official", "metadata")}


def test_written_layouts_load_with_the_real_loaders(layouts: dict[str, Path]) -> None:
    birds = load_grouped({"name": "waterbirds", "root": str(layouts["waterbirds"]),
                          "image_size": 16}, "Object", "Place")
    kaggle = load_grouped({"name": "celeba", "root": str(layouts["celeba"]),
                           "image_size": 16}, "Blond_Hair", "Male")
    official = load_grouped({"name": "celeba", "root": str(layouts["celeba-official"]),
                             "image_size": 16}, "Blond_Hair", "Male")
    flat = load_grouped({"name": "metadata", "root": str(layouts["metadata"]),
                         "image_size": 16}, "Odd", "Background")
    for data in (birds, kaggle, official, flat):
        assert len(data) == 60
        for split in ("train", "val", "test"):
            assert (data.group_counts(split) > 0).all(), (data.name, split)
        # Odd / Background of the embedded benchmark, whatever the layout calls them
        assert np.array_equal(data.y, birds.y) and np.array_equal(data.a, birds.a)
        assert np.array_equal(data.split, birds.split)
    assert layouts["celeba"].name == "celeba"
    assert (layouts["celeba"] / "img_align_celeba" / "img_align_celeba" / "000001.jpg").is_file()
    assert (layouts["celeba-official"] / "Anno" / "list_attr_celeba.txt").is_file()
    with Image.open(kaggle.image_paths[0]) as img:
        assert img.size == (24, 28)
    # an attribute the embedded benchmark lacks is filled at random: both classes present
    hats = load_grouped({"name": "celeba", "root": str(layouts["celeba"]), "image_size": 16},
                        "Wearing_Hat", "Male")
    assert 0 < hats.y.mean() < 1


def test_the_waterbirds_release_read_as_a_metadata_dataset(layouts: dict[str, Path]) -> None:
    """README, Datasets: Waterbirds' own metadata.csv is a metadata dataset as it is."""
    root = layouts["waterbirds"]
    birds = load_grouped({"name": "waterbirds", "root": str(root), "image_size": 16},
                         "Object", "Place")
    generic = load_grouped({"name": "metadata", "root": str(root), "image_size": 16,
                            "path_column": "img_filename", "split_column": "split",
                            "splits": {"train": "0", "val": "1", "test": "2"}}, "y", "place")
    assert np.array_equal(generic.y, birds.y) and np.array_equal(generic.a, birds.a)
    assert np.array_equal(generic.split, birds.split)
    assert generic.image_paths == birds.image_paths


def test_the_readme_conversion_of_celeba_runs(layouts: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's snippet that turns CelebA's two published files into one metadata CSV."""
    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"```python\n(# celeba_to_metadata\.py.+?)```", readme, re.S)
    assert snippet, "README lost its CelebA conversion snippet"
    monkeypatch.chdir(layouts["celeba"])
    exec(compile(snippet.group(1), "README.md", "exec"), {})  # the README's code, as shown
    celeba = load_grouped({"name": "celeba", "root": str(layouts["celeba"]),
                           "image_size": 16}, "Blond_Hair", "Male")
    generic = load_grouped({"name": "metadata", "root": str(layouts["celeba"]),
                            "image_size": 16}, "Blond_Hair", "Male")
    assert np.array_equal(generic.y, celeba.y) and np.array_equal(generic.a, celeba.a)
    assert np.array_equal(generic.split, celeba.split)


def test_the_writer_refuses_to_overwrite_and_names_bad_sizes(tmp_path: Path) -> None:
    from debias.data.export_layouts import parse_size

    write_dataset("metadata", tmp_path, images=24, size=(16, 16))
    with pytest.raises(DatasetError, match="already exists and is not empty"):
        write_dataset("metadata", tmp_path, images=24)
    assert parse_size("178x218") == (178, 218) and parse_size("64") == (64, 64)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("big")
