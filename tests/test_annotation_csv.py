"""The one annotation CSV reader: files as spreadsheets save them in any locale are read the
same; anything else is refused naming the file and the line; an unanswered file says how
to answer it; the pre-trial check raises what a trial would."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from debias.slim.annotations import (
    COLUMNS,
    AnnotationError,
    check_annotation_file,
    read_annotations,
    read_request_rows,
    read_table,
    request_splits,
    write_annotation_request,
)

IDS = ["a", "b", "c"]
ANSWERS = {"a": 1, "b": 0, "c": -1}


def _text(delimiter: str = ",", answers: tuple[str, ...] = ("1", "0", "-1"),
          label_class: str = "1", newline: str = "\r\n") -> str:
    lines = [delimiter.join(COLUMNS)]
    for i, (sample_id, answer) in enumerate(zip(IDS, answers, strict=True)):
        lines.append(delimiter.join([sample_id, "train", str(i), label_class,
                                     f"img/{sample_id}.png", f"ov/{i}.png", answer]))
    return newline.join(lines) + newline


@pytest.mark.parametrize(("name", "data"), [
    ("utf-8", _text().encode("utf-8")),
    ("utf-8 with BOM", codecs.BOM_UTF8 + _text().encode("utf-8")),
    ("utf-16 (Excel's 'Unicode text', tab-separated)",
     _text("\t").encode("utf-16")),  # Python writes the BOM
    ("utf-16 big-endian, semicolons", codecs.BOM_UTF16_BE + _text(";").encode("utf-16-be")),
    ("latin-1, semicolons (German Excel)", _text(";", label_class="Möwe").encode("latin-1")),
    ("cp1252 with a euro sign", _text(label_class="€ sign").encode("cp1252")),
    ("tab-separated, LF only", _text("\t", newline="\n").encode("utf-8")),
])
def test_spreadsheet_encodings_and_delimiters_read_the_same(tmp_path: Path, name: str,
                                                            data: bytes) -> None:
    path = tmp_path / "ann.csv"
    path.write_bytes(data)
    assert read_annotations(path, IDS) == ANSWERS, name
    assert read_annotations(path, IDS, split="train") == ANSWERS
    rows = read_request_rows(path)
    assert [r["id"] for r in rows] == IDS and request_splits(path) == {"train"}
    check_annotation_file(path)
    check_annotation_file(path, IDS, split="train")


def test_a_rewrite_keeps_encoding_delimiter_and_every_other_field(tmp_path: Path) -> None:
    path = tmp_path / "ann.csv"
    text = _text(";", answers=("", "", ""), label_class="Möwe").replace(
        ";annotation\r\n", ";annotation;note\r\n").replace("ov/0.png;\r\n", "ov/0.png;;x;y\r\n")
    path.write_bytes(text.encode("cp1252"))
    table = read_table(path)
    assert (table.codec, table.delimiter, table.newline) == ("cp1252", ";", "\r\n")
    number, _, _ = table.records()[0]
    table.set(number, "annotation", "1")
    table.write()
    expected = text.replace("ov/0.png;;x;y\r\n", "ov/0.png;1;x;y\r\n")
    assert path.read_bytes() == expected.encode("cp1252")


@pytest.mark.parametrize(("content", "pattern"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"ann\.csv, line 3: NUL bytes, so not a text CSV"),
    (_text().encode() + b"d,train,3,1,x,y,\x81\x8d\r\n",
     r"ann\.csv, line 5: byte 0x81 is neither UTF-8 nor latin-1/cp1252 text"),
    (codecs.BOM_UTF16_LE + b"i\x00d\x00\x00\xd8",
     r"ann\.csv, line 1: not valid UTF-16 text although it starts with a UTF-16"),
    (_text().encode() + b"d,train,3,1,x,\x01y,1\r\n",
     r"ann\.csv, line 5: control character U\+0001"),
    (b"id|split|annotation\r\na|train|1\r\n",
     r"ann\.csv, line 1: cannot tell the columns apart.*no comma, semicolon or tab"),
    (_text().encode() + b'd,train,"3,1,x,y,1\r\n', r"ann\.csv, line \d+: not readable as CSV"),
    (b"", r"ann\.csv is empty"),
    (b"\r\n \r\n", r"ann\.csv is empty"),
])
def test_what_is_not_a_request_csv_is_refused_naming_file_and_line(
        tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "ann.csv"
    path.write_bytes(content)
    with pytest.raises(AnnotationError, match=pattern):
        read_annotations(path, IDS)
    with pytest.raises(AnnotationError, match=pattern):
        check_annotation_file(path)


def test_a_directory_is_refused_by_reader_check_and_writer(tmp_path: Path) -> None:
    folder = tmp_path / "answers"
    folder.mkdir()
    pattern = r"answers is a directory; slim\.annotations must name the request CSV file"
    for call in (lambda: read_annotations(folder, IDS), lambda: check_annotation_file(folder),
                 lambda: read_request_rows(folder),
                 lambda: write_annotation_request(folder, [])):
        with pytest.raises(AnnotationError, match=pattern):
            call()


def test_duplicate_headers_are_refused_naming_the_column(tmp_path: Path) -> None:
    path = tmp_path / "ann.csv"
    path.write_text(_text().replace("id,split", "id,split,id", 1).replace(",train,", ",x,train,"))
    with pytest.raises(AnnotationError, match=r"ann\.csv, line 1: column 'id' appears twice "
                                              r"\(columns 1 and 3\)"):
        read_annotations(path, IDS)
    with pytest.raises(AnnotationError, match=r"column 'id' appears twice"):
        read_request_rows(path)


def test_an_unanswered_file_says_how_many_and_how_to_answer(tmp_path: Path) -> None:
    path = tmp_path / "ann.csv"
    path.write_text(_text(answers=("", "", "")))
    how = r"answer them in the browser with `python launch\.py SWEEP\.yaml --annotate`"
    with pytest.raises(AnnotationError, match=r"ann\.csv: none of its 3 requested row\(s\) is "
                                              rf"answered yet .*; {how}"):
        read_annotations(path, IDS)
    with pytest.raises(AnnotationError, match=r"none of its 3 requested row\(s\) for split "
                                              rf"'train' is answered yet .*; {how}"):
        check_annotation_file(path, split="train")
    path.write_text(_text(answers=("1", "", "")))
    with pytest.raises(AnnotationError, match=r"ann\.csv, line 3: id 'b' has no annotation; 2 "
                                              rf"of 3 requested row\(s\) are unanswered; {how}"):
        check_annotation_file(path)


def test_the_pre_trial_check_raises_what_a_trial_would(tmp_path: Path) -> None:
    path = tmp_path / "ann.csv"
    path.write_text(_text(answers=("1", "2", "0")))
    with pytest.raises(AnnotationError) as trial:
        read_annotations(path, IDS)
    with pytest.raises(AnnotationError) as check:
        check_annotation_file(path)
    assert str(check.value) == str(trial.value)
    assert "line 3: id 'b' has annotation '2'" in str(check.value)
    with pytest.raises(AnnotationError, match=r"annotation file .*nope\.csv does not exist"):
        check_annotation_file(tmp_path / "nope.csv")
    path.write_text(_text())
    with pytest.raises(AnnotationError, match=r"ann\.csv has no rows for split 'val'"):
        check_annotation_file(path, split="val")
    check_annotation_file(path, split="train")  # a complete file passes


def test_request_rows_keep_a_column_a_person_added(tmp_path: Path) -> None:
    path = tmp_path / "ann.csv"
    path.write_text(_text().replace(",annotation\r\n", ",annotation,note\r\n")
                    .replace(",1\r\n", ",1,looked twice\r\n", 1))
    rows = read_request_rows(path)
    write_annotation_request(path, [*rows, {**rows[0], "id": "d", "annotation": ""}])
    again = read_request_rows(path)
    assert [r["note"] for r in again] == ["looked twice", "", "", "looked twice"]
    assert [r["annotation"] for r in again] == ["1", "0", "-1", ""]
