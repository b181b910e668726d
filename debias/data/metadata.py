"""Any dataset described by one metadata CSV: a row per image, a column with its path, a
column with its split, and every other column an attribute (binary or categorical) that can
be a sweep's target or bias.

    dataset:
      name: metadata
      root: data/my_dataset                # the folder the paths are relative to
      file: metadata.csv                   # under root (default metadata.csv)
      path_column: img_filename            # default: path
      split_column: split                  # default: split
      splits: {train: 0, val: 1, test: 2}  # the split column's values (default train/val/test)

So MetaShift, NICO++, UrbanCars, Spawrious or a folder of your own photos need no loader, only
a CSV. Values of an attribute become classes 0..k-1: ``0``/``1`` as they are; ``-1``/``1``
(CelebA's convention) as 0/1; ``false``/``true`` and ``no``/``yes`` as 0/1; anything else
sorted (numerically where every value is a number) and numbered in that order; the plan
and the error messages name the values. Groups are target class x bias class.

Everything is checked before any trial, and every problem names the file and the line: a
missing column, an unknown split value, an empty target or bias value, a duplicated path, an
image that is missing or that PIL cannot identify (its header is read), and a group (target
value, bias value) with no image in one of the splits (worst-group accuracy would be
undefined there, and reweighting methods would divide by zero).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from debias.data.grouped import (
    SPLITS,
    DatasetError,
    GroupedDataset,
    _readonly,
    content_source,
)

__all__ = ["DEFAULTS", "attributes", "check_pair", "encode", "load"]

ATTRIBUTES: tuple[str, ...] = ()  # no fixed attributes: they are the CSV's columns
DEFAULTS: dict[str, Any] = {"file": "metadata.csv", "path_column": "path",
                            "split_column": "split",
                            "splits": {"train": "train", "val": "val", "test": "test"}}
_BINARY: tuple[tuple[str, str], ...] = (("0", "1"), ("-1", "1"), ("false", "true"),
                                        ("no", "yes"))


def _fail(problem: str) -> DatasetError:
    return DatasetError(f"metadata: {problem}")


def _settings(cfg: Mapping[str, Any]) -> tuple[Path, Path, str, str, dict[str, str]]:
    """(root, CSV path, path column, split column, {split value: split name})."""
    if not cfg.get("root"):
        raise _fail("no dataset.root given in the sweep file; expected the folder holding "
                    "the metadata CSV (dataset.file) and the images its paths name")
    root = Path(str(cfg["root"])).expanduser().resolve()
    meta = root / str(cfg.get("file") or DEFAULTS["file"])
    # dict(): the in-process dataset cache hands nested mappings over as (key, value) pairs
    splits = {**DEFAULTS["splits"], **dict(cfg.get("splits") or {})}
    values = {str(v): name for name, v in splits.items()}
    if len(values) != len(SPLITS) or set(splits) != set(SPLITS):
        raise _fail(f"dataset.splits must give three different values for train, val and "
                    f"test; got {splits}")
    return (root, meta, str(cfg.get("path_column") or DEFAULTS["path_column"]),
            str(cfg.get("split_column") or DEFAULTS["split_column"]), values)


def _header(meta: Path) -> list[str]:
    if not meta.is_file():
        raise _fail(f"{meta} not found; expected a CSV with a header line (dataset.file, "
                    "relative to dataset.root)")
    try:
        with meta.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"could not read {meta} ({exc}); expected a UTF-8 CSV") from exc
    header = [h.strip() for h in header]
    if not any(header):
        raise _fail(f"{meta} line 1: no header; expected column names, e.g. "
                    "path,split,label,background")
    return header


def attributes(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The attribute columns of the CSV (every column but the path and split columns):
    read from its header only, so a sweep file is checked without reading the images."""
    _, meta, path_col, split_col, _ = _settings(cfg)
    header = _header(meta)
    missing = [c for c in (path_col, split_col) if c not in header]
    if missing:
        raise _fail(f"{meta} line 1: no column {' or '.join(map(repr, missing))} (dataset."
                    f"{'path_column' if path_col in missing else 'split_column'}); the header "
                    f"has {header}")
    return tuple(h for h in header if h not in (path_col, split_col))


def check_pair(target: str, bias: str, cfg: Mapping[str, Any] | None = None) -> str | None:
    """Two different columns of the CSV (when ``cfg`` is given and its header readable)."""
    if target == bias:
        return f"metadata: target and bias are both {target!r}; they must differ"
    if cfg is None:
        return None
    try:
        known = attributes(cfg)
    except DatasetError as exc:
        return str(exc)
    for role, attr in (("target", target), ("bias", bias)):
        if attr not in known:
            return (f"metadata: unknown {role} attribute {attr!r}; the attribute columns of "
                    f"{cfg.get('file') or DEFAULTS['file']} are {', '.join(known)}")
    return None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def encode(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class codes 0..k-1 of an attribute's values and the value each code stands for."""
    distinct = set(values)
    lowered = {v.lower() for v in distinct}
    for no, yes in _BINARY:
        if lowered <= {no, yes}:
            names = (no, yes)
            return np.asarray([int(v.lower() == yes) for v in values], dtype=np.int64), names
    numbers = {v: _number(v) for v in distinct}
    if all(n is not None for n in numbers.values()):
        names = tuple(sorted(distinct, key=lambda v: (numbers[v], v)))
    else:
        names = tuple(sorted(distinct))
    code = {v: i for i, v in enumerate(names)}
    return np.asarray([code[v] for v in values], dtype=np.int64), names


def _unreadable(path: Path) -> str | None:
    """Why PIL cannot identify an image (its header only), or None."""
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed on open; size proves it
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"is not an image PIL can read ({type(exc).__name__}: {exc})"
    return None


def _check_images(meta: Path, paths: list[Path], lines: list[int]) -> None:
    workers = min(16, (os.cpu_count() or 1) * 4)
    with ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(_unreadable, paths, chunksize=256))
    bad = [(line, path, why) for line, path, why in zip(lines, paths, problems, strict=True)
           if why is not None]
    if bad:
        shown = "; ".join(f"line {line}: {path} {why}" for line, path, why in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise _fail(f"{len(bad)} of {len(paths)} images listed in {meta} cannot be read: "
                    f"{shown}{more}")


def load(cfg: dict, target: str, bias: str) -> GroupedDataset:
    """Read and check the CSV and its images; the (target, bias) view of it."""
    reason = check_pair(target, bias)
    if reason is not None:
        raise DatasetError(reason)
    root, meta, path_col, split_col, split_values = _settings(cfg)
    image_size = cfg.get("image_size") or 224
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise _fail(f"image_size must be a positive integer, got {image_size!r}")
    if not root.is_dir():
        raise _fail(f"root directory {root} does not exist; expected the folder holding "
                    f"{meta.name} and the images")
    known = attributes(cfg)
    for role, attr in (("target", target), ("bias", bias)):
        if attr not in known:
            raise _fail(f"{meta} line 1: no column {attr!r} (the {role}); the attribute "
                        f"columns are {', '.join(known)}")

    paths: list[str] = []
    lines: list[int] = []
    split: list[int] = []
    raw: dict[str, list[str]] = {target: [], bias: []}
    first_line: dict[str, int] = {}
    allowed = ", ".join(f"{v!r} ({name})" for v, name in split_values.items())
    try:
        with meta.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
            for row in reader:
                line = reader.line_num
                values = {k: (v or "").strip() if isinstance(v, str) else ""
                          for k, v in row.items() if k is not None}
                if not any(values.values()):
                    continue  # a blank line
                path = values.get(path_col, "")
                if not path:
                    raise _fail(f"{meta} line {line}: empty {path_col!r} (the image path)")
                if path in first_line:
                    raise _fail(f"{meta} line {line}: the image {path!r} is listed again "
                                f"(first on line {first_line[path]})")
                first_line[path] = line
                value = values.get(split_col, "")
                if value not in split_values:
                    raise _fail(f"{meta} line {line}: column {split_col!r} has value "
                                f"{value!r}; expected one of {allowed} (dataset.splits)")
                for attr in raw:
                    if not values.get(attr):
                        raise _fail(f"{meta} line {line}: column {attr!r} is empty; every "
                                    "image needs a target and a bias value")
                    raw[attr].append(values[attr])
                paths.append(path)
                lines.append(line)
                split.append(SPLITS.index(split_values[value]))
    except UnicodeDecodeError as exc:
        raise _fail(f"{meta} is not a UTF-8 text CSV ({exc})") from exc
    except csv.Error as exc:
        raise _fail(f"{meta} is not a valid CSV ({exc})") from exc
    except OSError as exc:
        raise _fail(f"could not read {meta} ({exc})") from exc
    if not paths:
        raise _fail(f"{meta} has a header but no rows")

    y, y_names = encode(raw[target])
    a, a_names = encode(raw[bias])
    if len(y_names) < 2:
        raise _fail(f"{meta}: the target column {target!r} has one value only "
                    f"({y_names[0]!r}); a classifier needs at least two")
    split_arr = np.asarray(split, dtype=np.int8)
    for code, split_name in enumerate(SPLITS):
        inside = split_arr == code
        counts = np.zeros((len(y_names), len(a_names)), dtype=np.int64)
        np.add.at(counts, (y[inside], a[inside]), 1)
        empty = [f"{target}={y_names[i]}, {bias}={a_names[j]}"
                 for i, j in zip(*np.nonzero(counts == 0), strict=True)]
        if empty:
            raise _fail(f"{meta}: the {split_name} split has no image of group(s) "
                        f"{'; '.join(empty)} (groups are {target} x {bias}); every group "
                        "needs images in every split: move some rows, or pick other "
                        "attributes")

    resolved = [root / p for p in paths]
    _check_images(meta, resolved, lines)
    return GroupedDataset(
        name="metadata",
        target=target,
        bias=bias,
        ids=_readonly(np.asarray(paths, dtype=str)),
        split=_readonly(split_arr),
        y=_readonly(y),
        a=_readonly(a),
        image_size=image_size,
        images=None,
        image_paths=tuple(resolved),
        masks=None,
        n_classes=len(y_names),
        n_bias=len(a_names),
        # The CSV's content and how it is read (which column is which, what the split
        # values mean): the same file read another way is another dataset.
        source=json.dumps({"csv": content_source(root, [meta], len(paths)),
                           "path_column": path_col, "split_column": split_col,
                           "splits": split_values}, sort_keys=True),
        class_names=y_names,
        bias_names=a_names,
    )
