"""The annotation exchange with a person (a CSV), and the annotators that stand in for one.

A request CSV lists the sampled images with their overlay PNGs and an empty ``annotation``
column; a person writes 1 (attention on the core object), 0 (not) or -1 (unsure, ignored).
One reader, :func:`read_table`, serves the trials, the annotation page and request updates;
it takes the file as a spreadsheet saved it in any locale (UTF-8/UTF-16/latin-1; comma,
semicolon or tab). Reading answers is strict, because a silent typo would change which data
SLIM keeps: every problem raises :class:`AnnotationError` naming the file, the line, the bad
value and what is allowed; :func:`check_annotation_file` raises the same before any trial.
One writer at a time: the annotation page holds ``<csv>.lock``
(:func:`claim_annotation_file`) for its whole life.

Without a person, two simulated annotators exist, and the pipeline tags which one it used:
``simulated_annotator`` thresholds AIOU against foreground masks (what a careful person
would answer, measured), and ``group_annotator`` for datasets without masks.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from debias.data.grouped import SPLITS
from debias.files import FileLock, LockHeld, acquire, atomic_write_bytes, atomic_write_text

__all__ = ["ALLOWED_LABELS", "ANNOTATE_COMMAND", "COLUMNS", "AnnotationError",
           "AnnotationTable", "annotation_lock_path", "check_annotation_file",
           "claim_annotation_file", "group_annotator", "read_annotations", "read_request_rows",
           "read_table", "request_splits", "simulated_annotator", "write_annotation_request"]

COLUMNS: tuple[str, ...] = ("id", "split", "position", "label_class", "image_path",
                            "overlay_path", "annotation")
ALLOWED_LABELS: tuple[int, ...] = (1, 0, -1)
_ALLOWED_TEXT = "1 (attention on the core object), 0 (not on it) or -1 (unsure)"
#: How a person answers a request, as error messages say it.
ANNOTATE_COMMAND = "python launch.py SWEEP.yaml --annotate"


class AnnotationError(ValueError):
    """A missing or malformed annotation file; the message says where and what is allowed."""


def annotation_lock_path(path: str | Path) -> Path:
    """``<csv>.lock`` beside the CSV: held by the annotation page serving it, for its whole
    life, and by :func:`write_annotation_request` while a page may be about."""
    path = Path(path)
    return path.with_name(f"{path.name}.lock")


def claim_annotation_file(path: str | Path) -> FileLock:
    """The one-writer lock of an annotation CSV, taken at once or refused: an
    AnnotationError names who holds it (the annotation page's URL and process, from the
    note it wrote). Release with :meth:`FileLock.release`."""
    path = Path(path)
    try:
        return acquire(annotation_lock_path(path), blocking=False)
    except LockHeld as held:
        holder = "another process (an annotation page starting up, or a request being written)"
        with contextlib.suppress(ValueError, TypeError, KeyError):
            note = json.loads(held.note)
            holder = f"the annotation page at {note['url']} (process {note['pid']})"
        raise AnnotationError(
            f"{path} is already open in {holder}; answer there (it saves every answer to this "
            "file), or stop that page (Ctrl-C in its terminal) first. One page per annotation "
            "file: two would overwrite each other's answers.") from None


def write_annotation_request(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write the CSV a person fills in; ``annotation`` is left empty unless a row gives one.
    Columns beyond :data:`COLUMNS` that rows carry (added by a person, read back by
    :func:`read_request_rows`) are kept after them. Written whole or not at all, UTF-8 and
    comma-separated; refused while an annotation page serves the file."""
    path = Path(path)
    if path.is_dir():
        raise AnnotationError(f"{path} is a directory; slim.annotations must name the "
                              f"request CSV file inside it (e.g. {path / 'annotations.csv'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    extra = list(dict.fromkeys(k for row in rows for k in row
                               if isinstance(k, str) and k and k not in COLUMNS))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *extra], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        missing = [c for c in COLUMNS if c != "annotation" and c not in row]
        if missing:
            raise ValueError(f"annotation request row lacks {missing}: {dict(row)}")
        writer.writerow({c: "" if row.get(c) is None else row.get(c, "")
                         for c in (*COLUMNS, *extra)})
    # Only where a page has been started on this file (its lock file exists): a request
    # written while one serves it would be overwritten by the page's next answer.
    lock = claim_annotation_file(path) if annotation_lock_path(path).exists() else None
    try:
        atomic_write_text(path, buffer.getvalue())
    finally:
        if lock is not None:
            lock.release()
    return path


# ---------------------------------------------------------------- the file, as a table
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    # (byte-order mark, codec of the text after it, name for messages); UTF-32 before UTF-16:
    # its little-endian mark starts with UTF-16's.
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)
_DELIMITERS: tuple[str, ...] = (",", ";", "\t")
_SAVE_AS = "save it as CSV (UTF-8), comma-, semicolon- or tab-separated"
#: C0 controls other than tab, LF, CR; DEL; C1 controls: never in a text CSV (binary data, or
#: a file in an encoding read as another).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass
class AnnotationTable:
    """A CSV file as read: every field of every line kept as written, so that a rewrite
    changes only the cells it sets and keeps the rest (columns a person added, stray fields
    past the header, blank lines, their order), in the file's own encoding, byte-order mark,
    delimiter and line ending. ``names`` are the header's stripped names; ``rows`` are
    (line number where the row ends, fields). Made by :func:`read_table`."""

    path: Path
    header: list[str]
    rows: list[tuple[int, list[str]]]
    codec: str = "utf-8"
    bom: bytes = b""
    delimiter: str = ","
    newline: str = "\r\n"
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [name.strip() for name in self.header]

    def column(self, name: str) -> int | None:
        """Position of the column named ``name`` (names compared stripped), None if absent."""
        return self.names.index(name) if name in self.names else None

    def require(self, *columns: str) -> None:
        for name in columns:
            if name not in self.names:
                found = ", ".join(n for n in self.names if n) or "nothing"
                raise AnnotationError(f"{self.path}, line 1: missing column {name!r}; the "
                                      f"header must contain {', '.join(COLUMNS)} (found "
                                      f"{found})")

    def records(self) -> list[tuple[int, int, dict[str, str]]]:
        """(row number in :attr:`rows`, line, {column name: value}) of each row that is not
        blank, named columns only; fields a short row lacks read as ""."""
        named = [(i, n) for i, n in enumerate(self.names) if n]
        out = []
        for number, (line, fields) in enumerate(self.rows):
            if any(f.strip() for f in fields):
                out.append((number, line, {n: fields[i] if i < len(fields) else ""
                                           for i, n in named}))
        return out

    def set(self, row: int, name: str, value: str) -> None:
        """Set one cell (a short row is padded with empty fields up to it)."""
        column = self.column(name)
        if column is None:
            raise KeyError(f"{self.path} has no column {name!r}")
        fields = self.rows[row][1]
        fields.extend([""] * (column + 1 - len(fields)))
        fields[column] = value

    def write(self) -> None:
        """Replace the file with the table, atomically (:func:`debias.files.atomic_write_bytes`)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=self.delimiter, lineterminator=self.newline)
        writer.writerow(self.header)
        writer.writerows(fields for _, fields in self.rows)
        atomic_write_bytes(self.path, self.bom + buffer.getvalue().encode(self.codec))


def _line_of(body: bytes, offset: int, codec: str) -> int:
    return body[:offset].decode(codec, errors="replace").count("\n") + 1


def _decode(path: Path, raw: bytes) -> tuple[str, str, bytes]:
    """(text, codec, byte-order mark): UTF-8/16/32 by their mark, else UTF-8, else cp1252
    (Windows' Western European code page, a superset of latin-1's printable characters)."""
    for bom, codec, name in _BOMS:
        if raw.startswith(bom):
            body = raw[len(bom):]
            try:
                return body.decode(codec), codec, bom
            except UnicodeDecodeError as exc:
                raise AnnotationError(
                    f"{path}, line {_line_of(body, exc.start, codec)}: not valid {name} text "
                    f"although it starts with a {name} byte-order mark; {_SAVE_AS}") from None
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise AnnotationError(f"{path}, line {line}: NUL bytes, so not a text CSV (a binary "
                              f"file, or UTF-16 without a byte-order mark); {_SAVE_AS}")
    try:
        return raw.decode("utf-8"), "utf-8", b""
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), "cp1252", b""
    except UnicodeDecodeError as exc:
        raise AnnotationError(
            f"{path}, line {_line_of(raw, exc.start, 'cp1252')}: byte 0x{raw[exc.start]:02x} "
            f"is neither UTF-8 nor latin-1/cp1252 text; {_SAVE_AS}") from None


def _sniff_delimiter(path: Path, first_line: str) -> str:
    """The delimiter of the header line: the one that splits it into the request's columns
    (``id`` and ``annotation`` found), else the one giving the most fields."""
    def score(delimiter: str) -> tuple[int, int]:
        names = {n.strip() for n in next(csv.reader([first_line], delimiter=delimiter), [])}
        return (len({"id", "annotation"} & names),
                len(next(csv.reader([first_line], delimiter=delimiter), [])))

    best = max(_DELIMITERS, key=score)
    if score(best)[1] < 2:
        shown = first_line if len(first_line) <= 80 else first_line[:77] + "..."
        raise AnnotationError(f"{path}, line 1: cannot tell the columns apart: the header "
                              f"{shown!r} has no comma, semicolon or tab between names; "
                              f"{_SAVE_AS}")
    return best


def read_table(path: str | Path) -> AnnotationTable:
    """The one reader of annotation CSVs (trials, the annotation page, request updates).

    Accepts what spreadsheet programs save in any locale: UTF-8 with or without a byte-order
    mark, UTF-16 (or UTF-32) with one, latin-1/cp1252 where the bytes are not UTF-8; the
    delimiter (comma, semicolon or tab) is sniffed from the header line. Anything else
    (binary data, a directory, unbalanced quotes, one column named twice) raises
    :class:`AnnotationError` naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        raise AnnotationError(f"{path} is a directory; slim.annotations must name the "
                              f"request CSV file inside it (e.g. {path / 'annotations.csv'})")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AnnotationError(f"annotation file {path} does not exist") from None
    except OSError as exc:
        raise AnnotationError(f"cannot read annotation file {path}: {exc.strerror or exc}"
                              ) from None
    text, codec, bom = _decode(path, raw)
    if (bad := _CONTROL.search(text)) is not None:
        line = text[:bad.start()].count("\n") + 1
        raise AnnotationError(f"{path}, line {line}: control character "
                              f"U+{ord(bad.group()):04X}, so not a text CSV (a binary file, or "
                              f"saved in an encoding other than UTF-8/UTF-16/latin-1); "
                              f"{_SAVE_AS}")
    if not text.strip():
        raise AnnotationError(f"{path} is empty; expected the request CSV with the header "
                              f"{','.join(COLUMNS)}")
    first_line = text.lstrip("\r\n").splitlines()[0]
    delimiter = _sniff_delimiter(path, first_line)
    crlf = text.find("\n")
    newline = "\r\n" if crlf > 0 and text[crlf - 1] == "\r" else "\n" if crlf >= 0 else "\r\n"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        header = next(reader)
        while not any(h.strip() for h in header):  # blank lines above the header
            header = next(reader)
        for fields in reader:
            rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise AnnotationError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}); "
                              "a quote opened and not closed?") from None
    table = AnnotationTable(path, header, rows, codec=codec, bom=bom, delimiter=delimiter,
                            newline=newline)
    seen: dict[str, int] = {}
    for position, name in enumerate(table.names, start=1):
        if not name:
            continue
        if name in seen:
            raise AnnotationError(
                f"{path}, line 1: column {name!r} appears twice (columns {seen[name]} and "
                f"{position}); each column once, or answers would be read from and written "
                "to the wrong one. Remove or rename the extra column.")
        seen[name] = position
    return table


def _parse_label(text: str, path: Path, line: int, sample_id: str) -> int:
    value = text.strip()
    try:
        label = int(value)
    except ValueError:
        label = None
    if label not in ALLOWED_LABELS:
        raise AnnotationError(f"{path}, line {line}: id {sample_id!r} has annotation {value!r}; "
                              f"allowed values are {_ALLOWED_TEXT}")
    return label


def _answers(path: Path, table: AnnotationTable, expected: set[str] | None,
             split: str | None) -> tuple[dict[str, int], list[tuple[int, str]], int]:
    """(labels by id, unanswered (line, id), rows considered) of the rows for ``split``
    (all rows without one), every row checked: split value, id known (if ``expected``),
    each id once, annotation empty or allowed."""
    table.require("id", "annotation")
    for_split = split is not None and table.column("split") is not None
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    unanswered: list[tuple[int, str]] = []
    for _, line, row in table.records():
        if for_split:
            row_split = row["split"].strip()
            if row_split not in SPLITS:
                raise AnnotationError(f"{path}, line {line}: split {row_split!r}; allowed "
                                      f"values are {', '.join(SPLITS)}")
            if row_split != split:
                continue
        sample_id = row["id"].strip()
        if expected is not None and sample_id not in expected:
            raise AnnotationError(f"{path}, line {line}: unknown id {sample_id!r}; only the "
                                  f"{len(expected)} requested ids are allowed (was the file "
                                  "written for another sampling?)")
        if not sample_id:
            raise AnnotationError(f"{path}, line {line}: the row has no id; keep every "
                                  "requested row as it was written")
        if sample_id in first_line:
            raise AnnotationError(f"{path}, line {line}: duplicate id {sample_id!r} (first "
                                  f"on line {first_line[sample_id]}); each id once")
        first_line[sample_id] = line
        if row["annotation"].strip() == "":
            unanswered.append((line, sample_id))
        else:
            labels[sample_id] = _parse_label(row["annotation"], path, line, sample_id)
    return labels, unanswered, len(first_line)


def _refuse_unanswered(path: Path, unanswered: list[tuple[int, str]], rows: int,
                       split: str | None) -> None:
    if not unanswered:
        return
    where = f" for split {split!r}" if split is not None else ""
    how = (f"answer them in the browser with `{ANNOTATE_COMMAND}`, or write {_ALLOWED_TEXT} "
           "in the 'annotation' column; then run the sweep again")
    if len(unanswered) == rows:
        raise AnnotationError(f"{path}: none of its {rows} requested row(s){where} is answered "
                              f"yet (the 'annotation' column is empty); {how}")
    line, sample_id = unanswered[0]
    raise AnnotationError(f"{path}, line {line}: id {sample_id!r} has no annotation; "
                          f"{len(unanswered)} of {rows} requested row(s){where} are "
                          f"unanswered; {how}")


def _missing_file(path: Path) -> AnnotationError:
    return AnnotationError(f"annotation file {path} does not exist; it must be the request "
                           f"CSV with the 'annotation' column filled in ({_ALLOWED_TEXT})")


def read_annotations(path: str | Path, expected_ids: Iterable[str],
                     split: str | None = None) -> dict[str, int]:
    """Labels by id from a filled-in request, checked against the ids that were asked for.

    Every requested id must appear exactly once with a label in {1, 0, -1}; rows for ids
    that were never requested are refused (they usually mean the file belongs to another
    sampling, e.g. a different budget or seed). With ``split``, rows whose ``split`` column
    names another split are left alone: one file can answer the training images of full
    retraining and the validation images of last-layer retraining. The file is read by
    :func:`read_table` (any common encoding and delimiter).
    """
    path = Path(path)
    expected = [str(i) for i in expected_ids]
    if not path.exists():
        raise _missing_file(path)
    labels, unanswered, rows = _answers(path, read_table(path), set(expected), split)
    _refuse_unanswered(path, unanswered, rows, split)
    absent = [i for i in expected if i not in labels]
    if absent:
        shown = ", ".join(repr(i) for i in absent[:5]) + (" ..." if len(absent) > 5 else "")
        raise AnnotationError(f"{path}: {len(absent)} requested id(s) have no row: {shown}; "
                              f"keep every requested row and annotate it with {_ALLOWED_TEXT}")
    return labels


def check_annotation_file(path: str | Path, expected_ids: Iterable[str] | None = None,
                          split: str | None = None) -> None:
    """Raise the AnnotationError a trial would hit on this file, before any trial starts.

    With ``expected_ids``: exactly :func:`read_annotations`. Without (what a driver knows
    before sampling): the file is readable (:func:`read_table`), has the ``id`` and
    ``annotation`` columns and, for ``split`` (every row when None), at least one row, every
    split value known, each id once, every annotation one of {1, 0, -1}, none left empty.
    """
    path = Path(path)
    if expected_ids is not None:
        read_annotations(path, expected_ids, split)
        return
    if not path.exists():
        raise _missing_file(path)
    _, unanswered, rows = _answers(path, read_table(path), None, split)
    if rows == 0:
        where = f" for split {split!r}" if split is not None else ""
        raise AnnotationError(f"{path} has no rows{where}; build the request with "
                              f"`{ANNOTATE_COMMAND}` (or by running the sweep)")
    _refuse_unanswered(path, unanswered, rows, split)


def read_request_rows(path: str | Path) -> list[dict[str, str]]:
    """Every row of a request CSV, answers included, as written (``split`` filled in as
    ``train`` for files that predate the column), so rows can be added without losing any:
    columns a person added come along by name (fields past the header do not)."""
    return [{**row, "split": (row.get("split") or "train").strip()}
            for _, _, row in read_table(path).records()]


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
