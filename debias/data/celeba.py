"""CelebA in either the official layout (Anno/, Eval/ text files) or Kaggle's CSV layout.

Any of the 40 binary attributes can be the target or the bias; values are +-1 on disk and 0/1 here.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from debias.data.grouped import DatasetError, GroupedDataset, _readonly, content_source

ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
# Looked for in this order; the flat .txt variants are how some mirrors ship the official files.
ATTR_FILES: tuple[str, ...] = (
    "list_attr_celeba.csv", "Anno/list_attr_celeba.txt", "list_attr_celeba.txt")
PARTITION_FILES: tuple[str, ...] = (
    "list_eval_partition.csv", "Eval/list_eval_partition.txt", "list_eval_partition.txt")
IMAGE_DIRS: tuple[str, ...] = (
    "img_align_celeba", "Img/img_align_celeba", "img_align_celeba/img_align_celeba")
HOW_TO_GET = (
    "Get CelebA from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (keep Anno/, Eval/ and "
    "Img/img_align_celeba/) or from Kaggle's jessicali9530/celeba-dataset (unzip so that "
    "list_attr_celeba.csv is directly under the configured dataset.root).")
_PM1 = {"1": 1, "-1": 0}


def check_pair(target: str, bias: str) -> str | None:
    """Any two different attributes out of the 40."""
    for role, attr in (("target", target), ("bias", bias)):
        if attr not in ATTRIBUTES:
            return (f"celeba: unknown {role} attribute {attr!r}; expected one of the 40 CelebA "
                    f"attributes ({', '.join(ATTRIBUTES)})")
    if target == bias:
        return f"celeba: target and bias are both {target!r}; they must differ"
    return None


def _fail(problem: str) -> DatasetError:
    return DatasetError(f"celeba: {problem}. {HOW_TO_GET}")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"could not read {path} ({exc})") from exc


def _check_names(path: Path, names: list[str]) -> None:
    if sorted(names) != sorted(ATTRIBUTES):
        missing = sorted(set(ATTRIBUTES) - set(names))
        extra = sorted(set(names) - set(ATTRIBUTES))
        raise _fail(f"{path} does not list the 40 CelebA attributes (missing {missing}, "
                    f"unexpected {extra})")


def _pm1(path: Path, line: int, name: str, raw: str) -> int:
    try:
        return _PM1[raw]
    except KeyError:
        raise _fail(f"{path} line {line}: attribute {name} has value {raw!r}, "
                    "expected 1 or -1") from None


def _read_attributes(path: Path, wanted: tuple[str, str]) -> tuple[list[str], np.ndarray]:
    """Image ids and an N x 2 array (0/1) of the two wanted attributes."""
    lines = _read_lines(path)
    ids: list[str] = []
    rows: list[tuple[int, ...]] = []
    count: int | None = None
    if path.suffix == ".csv":
        table = list(csv.reader(lines))
        if not table or not table[0] or table[0][0].strip() != "image_id":
            raise _fail(f"{path} must start with a header 'image_id,5_o_Clock_Shadow,...'")
        names = [n.strip() for n in table[0][1:]]
        body = enumerate(table[1:], start=2)
    else:
        if len(lines) < 2:
            raise _fail(f"{path} is too short; expected a count line, a line of the 40 "
                        "attribute names, then one row per image")
        try:
            count = int(lines[0].strip())
        except ValueError:
            raise _fail(f"{path} line 1 should be the number of images, got "
                        f"{lines[0][:50]!r}") from None
        names = lines[1].split()
        body = ((i, ln.split()) for i, ln in enumerate(lines[2:], start=3) if ln.strip())
    _check_names(path, names)
    cols = [names.index(w) + 1 for w in wanted]
    for line, fields in body:
        if path.suffix == ".csv" and not any(f.strip() for f in fields):
            continue
        if len(fields) != len(names) + 1:
            raise _fail(f"{path} line {line} has {len(fields)} fields, expected "
                        f"{len(names) + 1} (image id + {len(names)} attributes)")
        ids.append(fields[0].strip())
        rows.append(tuple(
            _pm1(path, line, w, fields[c].strip()) for w, c in zip(wanted, cols, strict=True)))
    if not ids:
        raise _fail(f"{path} lists no images")
    if count is not None and count != len(ids):
        raise _fail(f"{path} says it has {count} images on line 1 but lists {len(ids)}")
    return ids, np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _read_partition(path: Path) -> tuple[list[str], np.ndarray]:
    """Image ids and their split codes (0 train, 1 val, 2 test)."""
    lines = _read_lines(path)
    if path.suffix == ".csv":
        table = list(csv.reader(lines))
        if not table or [h.strip() for h in table[0][:2]] != ["image_id", "partition"]:
            raise _fail(f"{path} must start with the header 'image_id,partition'")
        body = enumerate(table[1:], start=2)
    else:
        body = enumerate((ln.split() for ln in lines), start=1)
    ids: list[str] = []
    codes: list[int] = []
    for line, fields in body:
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != 2 or fields[1].strip() not in ("0", "1", "2"):
            raise _fail(f"{path} line {line}: expected '<image id> <0|1|2>', got {fields!r}")
        ids.append(fields[0].strip())
        codes.append(int(fields[1]))
    if not ids:
        raise _fail(f"{path} lists no images")
    return ids, np.asarray(codes, dtype=np.int8)


def _first_existing(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    looked = ", ".join(str(root / rel) for rel in candidates)
    raise _fail(f"no {what} found under {root}; looked for {looked}")


def _align(attr_path: Path, attr_ids: list[str], part_path: Path, part_ids: list[str],
           split: np.ndarray) -> np.ndarray:
    """Split codes in attribute-file order; the two files must list exactly the same ids."""
    if attr_ids == part_ids:
        return split
    if len(set(attr_ids)) != len(attr_ids):
        raise _fail(f"{attr_path} lists some image ids more than once")
    if len(set(part_ids)) != len(part_ids):
        raise _fail(f"{part_path} lists some image ids more than once")
    only_attr = sorted(set(attr_ids) - set(part_ids))
    only_part = sorted(set(part_ids) - set(attr_ids))
    if only_attr or only_part:
        raise _fail(f"{attr_path} and {part_path} disagree on image ids: {len(only_attr)} only "
                    f"in the attribute file (e.g. {only_attr[:3]}), {len(only_part)} only in the "
                    f"partition file (e.g. {only_part[:3]})")
    position = {image_id: i for i, image_id in enumerate(part_ids)}
    return split[[position[i] for i in attr_ids]]


def _image_dir(root: Path, first_id: str) -> Path:
    for rel in IMAGE_DIRS:
        if (root / rel / first_id).is_file():
            return root / rel
    looked = ", ".join(str(root / rel) for rel in IMAGE_DIRS)
    raise _fail(f"could not find the image folder: none of {looked} contains the first listed "
                f"image {first_id}")


def load(cfg: dict, target: str, bias: str) -> GroupedDataset:
    """Detect the layout, read the two wanted attributes, and check every image file exists."""
    reason = check_pair(target, bias)
    if reason is not None:
        raise DatasetError(reason)
    if not cfg.get("root"):
        raise _fail("no dataset.root given in the sweep file; expected the CelebA directory")
    root = Path(cfg["root"]).expanduser().resolve()
    image_size = cfg.get("image_size", 224)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise _fail(f"image_size must be a positive integer, got {image_size!r}")
    if not root.is_dir():
        raise _fail(f"root directory {root} does not exist; expected a directory holding "
                    f"{' or '.join(ATTR_FILES)}")

    attr_path = _first_existing(root, ATTR_FILES, "attribute file")
    part_path = _first_existing(root, PARTITION_FILES, "partition file")
    ids, values = _read_attributes(attr_path, (target, bias))
    part_ids, part_split = _read_partition(part_path)
    split = _align(attr_path, ids, part_path, part_ids, part_split)

    img_dir = _image_dir(root, ids[0])
    try:
        present = set(os.listdir(img_dir))
    except OSError as exc:
        raise _fail(f"could not list {img_dir} ({exc})") from exc
    missing = [i for i in ids if i not in present]
    if missing:
        raise _fail(f"{len(missing)} of {len(ids)} images listed in {attr_path} are missing "
                    f"from {img_dir}, e.g. {missing[:5]}")

    return GroupedDataset(
        name="celeba",
        target=target,
        bias=bias,
        ids=_readonly(np.asarray(ids, dtype=str)),
        split=_readonly(np.asarray(split, dtype=np.int8)),
        y=_readonly(values[:, 0].copy()),
        a=_readonly(values[:, 1].copy()),
        image_size=image_size,
        images=None,
        image_paths=tuple(img_dir / i for i in ids),
        masks=None,
        source=content_source(root, [attr_path, part_path], len(ids)),
    )
