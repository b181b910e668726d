"""The annotation page's hold on one request CSV: one writer, and one cell per answer.

The store never works from a copy in memory. What the page shows and every answer it saves
start from a fresh read of the file, by the same reader the trials use
(:func:`~debias.slim.annotations.read_table`). An answer rewrites one cell, the row's
``annotation``, and keeps every other byte's meaning: columns a person added, stray fields
past the header, blank lines, the file's encoding, delimiter and line ending. So whatever
another editor wrote in between (a spreadsheet, rows added for another retrain mode) is
kept. The page names the row it answers (``id``); if the file was reordered meanwhile the
answer is refused (:class:`AnswerConflict`), not written to another row.

For its whole life the store holds the file's lock, ``<csv>.lock``
(:func:`~debias.slim.annotations.claim_annotation_file`), and writes its page's URL into it
(:meth:`AnnotationStore.announce`): a second store on the same CSV, i.e. a second
``--annotate``, is refused with a message naming the first one's URL. Where the file system
refuses locks the store runs unlocked; fresh reads before each write still keep what
others wrote, short of two answers saved at the same instant.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from debias.slim.annotations import (
    ALLOWED_LABELS,
    COLUMNS,
    AnnotationError,
    AnnotationTable,
    claim_annotation_file,
    read_table,
)

__all__ = ["REQUIRED_COLUMNS", "AnnotationStore", "AnswerConflict"]

#: What the page needs of a request CSV.
REQUIRED_COLUMNS: tuple[str, ...] = ("id", "label_class", "overlay_path", "annotation")


class AnswerConflict(AnnotationError):
    """The row the page answered is no longer where it was (the file changed meanwhile)."""


def _label(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value in ALLOWED_LABELS else None


class AnnotationStore:
    """The request CSV at ``path``, held (its lock taken) until :meth:`close`.

    Raises AnnotationError when another page holds the file (naming its URL), or when the
    file cannot be read as a request (missing columns, no rows, any reader error).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.overlay_dir = self.path.with_name(f"{self.path.stem}_overlays").resolve()
        self._lock = threading.Lock()  # one answer at a time within this process
        self._claim = claim_annotation_file(self.path)
        try:
            self._read()
        except BaseException:
            self._claim.release()
            raise

    def announce(self, url: str) -> None:
        """Record who holds the file (this page's URL and process), for a second page's
        refusal message."""
        self._claim.note(json.dumps({"url": url, "pid": os.getpid()}))

    def close(self) -> None:
        """Let the file go: another page may start on it. Idempotent."""
        self._claim.release()

    def _read(self) -> tuple[AnnotationTable, list[tuple[int, int, dict[str, str]]]]:
        table = read_table(self.path)
        missing = [c for c in REQUIRED_COLUMNS if table.column(c) is None]
        if missing:
            raise AnnotationError(f"{self.path}: missing column(s) {', '.join(missing)}; the "
                                  f"annotation page needs the request CSV ({', '.join(COLUMNS)})"
                                  " as the sweep writes it")
        records = table.records()
        if not records:
            raise AnnotationError(f"{self.path}: the request has no rows")
        return table, records

    def items(self) -> list[dict[str, Any]]:
        """One entry per request row, as the file is now: index, id, class, answer (None
        where unanswered or not an allowed value)."""
        with self._lock:
            _, records = self._read()
        return [{"index": i, "id": row["id"].strip(), "label_class": row["label_class"],
                 "annotation": _label(row["annotation"])}
                for i, (_, _, row) in enumerate(records)]

    def answer(self, index: int, label: int, expected_id: str | None = None) -> None:
        """Write ``label`` into row ``index``'s annotation, everything else as it is in the
        file now. ``label`` must be the int 1, 0 or -1 (not a bool, float or text);
        ``expected_id``: the id the page showed at ``index`` (refused if it moved)."""
        if type(label) is not int or label not in ALLOWED_LABELS:
            raise ValueError(f"annotation must be one of {ALLOWED_LABELS} (a JSON integer), "
                             f"got {label!r}"[:200])
        if type(index) is not int:
            raise TypeError(f"index must be an integer, got {index!r}"[:200])
        with self._lock:
            table, records = self._read()
            if not 0 <= index < len(records):
                raise IndexError(f"no item {index}; the request has {len(records)}")
            row_number, line, row = records[index]
            if expected_id is not None and row["id"].strip() != expected_id:
                raise AnswerConflict(
                    f"{self.path}, line {line}: item {index} is now id {row['id'].strip()!r}, "
                    f"not {expected_id!r} (the file was changed meanwhile); reload the page")
            table.set(row_number, "annotation", str(label))
            table.write()

    def overlay(self, index: int) -> Path | None:
        """The overlay PNG of row ``index`` if it lies inside the request's overlay folder
        (a folder moved together with its CSV is found by file name)."""
        with self._lock:
            _, records = self._read()
        if not 0 <= index < len(records):
            return None
        stored = Path(records[index][2]["overlay_path"].strip())
        if not stored.name:
            return None
        candidates = [stored if stored.is_absolute() else self.path.parent / stored,
                      self.overlay_dir / stored.name]
        for candidate in candidates:
            resolved = candidate.resolve()
            if (resolved.is_relative_to(self.overlay_dir) and resolved.suffix.lower() == ".png"
                    and resolved.is_file()):
                return resolved
        return None
