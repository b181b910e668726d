"""The annotation exchange with a person (a CSV), and the annotators that stand in for one.

A request CSV lists the sampled images with their overlay PNGs and an empty ``annotation``
column; a person writes 1 (attention on the core object), 0 (not) or -1 (unsure, ignored).
Reading it back is strict, because a silent typo would change which data SLIM keeps: every
problem raises :class:`AnnotationError` naming the file, the line, the bad value and what is
allowed.

Without a person, two simulated annotators exist, and the pipeline tags which one it used:
``simulated_annotator`` thresholds AIOU against foreground masks (what a careful person
would answer, measured), and ``group_annotator`` for datasets without masks.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from debias.data.grouped import SPLITS
from debias.files import atomic_write_text

__all__ = ["ALLOWED_LABELS", "COLUMNS", "AnnotationError", "group_annotator",
           "read_annotations", "read_request_rows", "request_splits", "simulated_annotator",
           "write_annotation_request"]

COLUMNS: tuple[str, ...] = ("id", "split", "position", "label_class", "image_path",
                            "overlay_path", "annotation")
ALLOWED_LABELS: tuple[int, ...] = (1, 0, -1)
_ALLOWED_TEXT = "1 (attention on the core object), 0 (not on it) or -1 (unsure)"


class AnnotationError(ValueError):
    """A missing or malformed annotation file; the message says where and what is allowed."""


def write_annotation_request(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write the CSV a person fills in; ``annotation`` is left empty unless a row gives one.
    Written whole or not at all (:func:`debias.files.atomic_write_text`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        missing = [c for c in COLUMNS if c != "annotation" and c not in row]
        if missing:
            raise ValueError(f"annotation request row lacks {missing}: {dict(row)}")
        writer.writerow({c: "" if row.get(c) is None else row.get(c, "") for c in COLUMNS})
    atomic_write_text(path, buffer.getvalue())
    return path


def _parse_label(text: str, path: Path, line: int, sample_id: str) -> int:
    value = text.strip()
    if value == "":
        raise AnnotationError(f"{path}, line {line}: id {sample_id!r} has no annotation; "
                              f"write {_ALLOWED_TEXT}")
    try:
        label = int(value)
    except ValueError:
        label = None
    if label not in ALLOWED_LABELS:
        raise AnnotationError(f"{path}, line {line}: id {sample_id!r} has annotation {value!r}; "
                              f"allowed values are {_ALLOWED_TEXT}")
    return label


def read_annotations(path: str | Path, expected_ids: Iterable[str],
                     split: str | None = None) -> dict[str, int]:
    """Labels by id from a filled-in request, checked against the ids that were asked for.

    Every requested id must appear exactly once with a label in {1, 0, -1}; rows for ids
    that were never requested are refused (they usually mean the file belongs to another
    sampling, e.g. a different budget or seed). With ``split``, rows whose ``split`` column
    names another split are left alone: one file can answer the training images of full
    retraining and the validation images of last-layer retraining.
    """
    path = Path(path)
    expected = [str(i) for i in expected_ids]
    expected_set = set(expected)
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} does not exist; it must be the request "
                              f"CSV with the 'annotation' column filled in ({_ALLOWED_TEXT})")
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        for column in ("id", "annotation"):
            if column not in header:
                raise AnnotationError(f"{path}, line 1: missing column {column!r}; the header "
                                      f"must contain {', '.join(COLUMNS)} (found "
                                      f"{', '.join(header) or 'nothing'})")
        reader.fieldnames = header
        for_split = split is not None and "split" in header
        for row in reader:
            line = reader.line_num
            if for_split:
                row_split = (row.get("split") or "").strip()
                if row_split not in SPLITS:
                    raise AnnotationError(f"{path}, line {line}: split {row_split!r}; allowed "
                                          f"values are {', '.join(SPLITS)}")
                if row_split != split:
                    continue
            sample_id = (row.get("id") or "").strip()
            if sample_id not in expected_set:
                raise AnnotationError(f"{path}, line {line}: unknown id {sample_id!r}; only the "
                                      f"{len(expected)} requested ids are allowed (was the file "
                                      "written for another sampling?)")
            if sample_id in labels:
                raise AnnotationError(f"{path}, line {line}: duplicate id {sample_id!r} (first "
                                      f"on line {first_line[sample_id]}); each id once")
            labels[sample_id] = _parse_label(row.get("annotation") or "", path, line, sample_id)
            first_line[sample_id] = line
    absent = [i for i in expected if i not in labels]
    if absent:
        shown = ", ".join(repr(i) for i in absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise AnnotationError(f"{path}: {len(absent)} requested id(s) have no row: {shown}; "
                              f"keep every requested row and annotate it with {_ALLOWED_TEXT}")
    return labels


def read_request_rows(path: str | Path) -> list[dict[str, str]]:
    """Every row of a request CSV, answers included, as written (``split`` filled in as
    ``train`` for files that predate the column), so rows can be added without losing any."""
    with Path(path).open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [h.strip() for h in (reader.fieldnames or [])]
        return [{**row, "split": (row.get("split") or "train").strip()} for row in reader]


def request_splits(path: str | Path) -> set[str]:
    """The splits a request CSV has rows for."""
    return {row["split"] for row in read_request_rows(path)}


def simulated_annotator(aiou_values: np.ndarray, threshold: float) -> np.ndarray:
    """Label 1 where AIOU >= threshold, else 0 (int64). NaN AIOU (no mask) is refused, not
    guessed: use :func:`group_annotator` for datasets without masks."""
    values = np.asarray(aiou_values, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("AIOU is unknown (NaN) for some images: the dataset has no foreground "
                         "masks, so the AIOU annotator cannot label them")
    return (values >= threshold).astype(np.int64)


def group_annotator(y: np.ndarray, a: np.ndarray, positions: np.ndarray | None = None,
                    majority_of: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Stand-in for a person on datasets without masks: label 1 iff the sample is in a
    minority group (its bias value differs from the majority bias value of its class).

    It uses the bias labels, which SLIM itself never sees, so runs using it must be tagged
    as simulated. The majority is taken over ``majority_of`` = (y, a) of the training split
    where given (a group-balanced validation split has no majority of its own), else over
    all of ``y``/``a``; labels are returned for ``positions`` (default: every sample).
    """
    y = np.asarray(y, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    ref_y, ref_a = ((y, a) if majority_of is None
                    else (np.asarray(majority_of[0], dtype=np.int64),
                          np.asarray(majority_of[1], dtype=np.int64)))
    n_classes = int(max(ref_y.max(initial=-1), y.max(initial=-1))) + 1
    n_bias = int(max(ref_a.max(initial=-1), a.max(initial=-1))) + 1
    counts = np.zeros((n_classes, max(n_bias, 1)), dtype=np.int64)
    np.add.at(counts, (ref_y, ref_a), 1)
    majority = counts.argmax(axis=1)
    rows = np.arange(len(y)) if positions is None else np.asarray(positions, dtype=np.int64)
    return (a[rows] != majority[y[rows]]).astype(np.int64)
