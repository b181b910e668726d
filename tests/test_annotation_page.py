"""The annotation page's server against two writers and hostile input, in-process over raw
sockets: one page per CSV (the second names the first's URL), answers that keep every other
field of the file, and a 4xx with a reason for every malformed request, the server still
answering afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from debias.commands import interpreter
from debias.slim.annotate import annotate_command, sweep_command
from debias.slim.annotation_page import (
    MAX_BODY,
    AnnotationServer,
    start_annotation_server,
    stop_annotation_server,
)
from debias.slim.annotations import (
    AnnotationError,
    read_annotations,
    write_annotation_request,
)
from tests.conftest import REPO

IDS = ["a", "b", "c"]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000000000300010d0a2db40000000049454e44ae426082")


def _request(path: Path) -> Path:
    overlays = path.with_name(f"{path.stem}_overlays")
    overlays.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample_id in enumerate(IDS):
        (overlays / f"{i}.png").write_bytes(PNG)
        rows.append({"id": sample_id, "split": "train", "position": i, "label_class": i % 2,
                     "image_path": f"img/{sample_id}.png",
                     "overlay_path": str(overlays / f"{i}.png")})
    return write_annotation_request(path, rows)


@contextlib.contextmanager
def serving(csv_path: Path, command: str = "python launch.py x.yaml"
            ) -> Iterator[tuple[str, AnnotationServer]]:
    url, server = start_annotation_server(csv_path, command, 0)
    try:
        yield url, server
    finally:
        stop_annotation_server(server)


def raw(server: AnnotationServer, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` as is; (status, body) of the reply, read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=20) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/"), reply[:200]  # an answer, not a dropped connection
    return int(head.split()[1]), body


def http(server: AnnotationServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    port = server.server_address[1]
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    fields = {"Content-Type": "application/json"} if body is not None else {}
    if body is not None:
        fields["Content-Length"] = str(len(body))
    fields.update(headers or {})
    lines += [f"{k}: {v}" for k, v in fields.items()]
    return raw(server, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))


def answer(server: AnnotationServer, index: int, label: object, **extra: object
           ) -> tuple[int, bytes]:
    return http(server, "POST", "/api/answer",
                json.dumps({"index": index, "annotation": label, **extra}).encode())


def state(server: AnnotationServer) -> list[object]:
    status, body = http(server, "GET", "/api/state")
    assert status == 200, body
    return [item["annotation"] for item in json.loads(body)["items"]]


# ---------------------------------------------------------------- one page per CSV
def test_a_second_page_on_the_same_csv_is_refused_naming_the_first(tmp_path: Path) -> None:
    csv_path = _request(tmp_path / "ann.csv")
    with serving(csv_path) as (url, _):
        with pytest.raises(AnnotationError) as refused:
            start_annotation_server(csv_path, "cmd", 0)
        message = str(refused.value)
        assert f"the annotation page at {url} (process {os.getpid()})" in message
        assert "is already open in" in message and str(csv_path) in message
        with pytest.raises(AnnotationError, match=rf"already open in the annotation page at "
                                                  rf"{url}"):
            write_annotation_request(csv_path, [])  # nor may a request overwrite it
    # The first one stopped: the file is free again.
    with serving(csv_path) as (url2, server2):
        assert url2 and state(server2) == [None, None, None]


def test_a_second_annotate_command_is_refused_with_the_first_ones_url(tmp_path: Path) -> None:
    csv_path = _request(tmp_path / "ann.csv")
    sets = ["slim.annotator=csv", f"slim.annotations={csv_path}", f"storage={tmp_path}",
            "targets=[Odd]", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    with serving(csv_path) as (url, _):
        done = subprocess.run(
            [sys.executable, "launch.py", "sweeps/slim_synthetic.yaml", "--annotate", "--port",
             "0", *(a for s in sets for a in ("--set", s))], cwd=REPO, capture_output=True,
            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"is already open in the annotation page at {url}" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- answers keep the file
def test_answers_keep_added_columns_stray_fields_and_the_files_format(tmp_path: Path) -> None:
    csv_path = _request(tmp_path / "ann.csv")
    text = csv_path.read_bytes().decode()
    header, *rows = text.split("\r\n")[:-1]
    # A person added a column, a stray field past the header, and saved it as German Excel
    # does: semicolons, cp1252.
    lines = [header + ",note", rows[0] + ",Möwe,stray", rows[1], rows[2] + ",€"]
    original = "\r\n".join(line.replace(",", ";") for line in lines) + "\r\n"
    csv_path.write_bytes(original.encode("cp1252"))
    with serving(csv_path) as (_, server):
        assert answer(server, 0, 1, id="a")[0] == 200
        assert answer(server, 2, -1)[0] == 200
        assert state(server) == [1, None, -1]
    expected = (original.replace(";Möwe;stray", "1;Möwe;stray")  # the empty annotation cell
                .replace(";€", "-1;€"))
    assert csv_path.read_bytes() == expected.encode("cp1252")


def test_answers_keep_what_another_editor_wrote_meanwhile(tmp_path: Path) -> None:
    csv_path = _request(tmp_path / "ann.csv")
    with serving(csv_path) as (_, server):
        assert answer(server, 0, 1)[0] == 200
        # A spreadsheet saves the file while the page is open: a new column, row c answered.
        edited = (csv_path.read_bytes().decode().replace(",annotation\r\n", ",annotation,who\r\n")
                  .replace("/2.png,\r\n", "/2.png,0,me\r\n"))
        csv_path.write_text(edited, newline="")
        assert answer(server, 1, -1)[0] == 200
        assert state(server) == [1, -1, 0]
        assert "who" in csv_path.read_text().splitlines()[0]
        assert csv_path.read_text().splitlines()[3].endswith(",0,me")
        # The rows were reordered meanwhile: an answer meant for 'a' is not written to 'c'.
        lines = csv_path.read_bytes().decode().split("\r\n")
        csv_path.write_text("\r\n".join([lines[0], lines[3], lines[2], lines[1], ""]),
                            newline="")
        before = csv_path.read_bytes()
        status, body = answer(server, 0, 0, id="a")
        assert status == 409 and b"is now id 'c', not 'a'" in body
        assert csv_path.read_bytes() == before
    assert read_annotations(csv_path, IDS) == {"a": 1, "b": -1, "c": 0}


def test_duplicate_headers_are_refused_never_mis_written(tmp_path: Path) -> None:
    csv_path = _request(tmp_path / "ann.csv")
    good = csv_path.read_bytes().decode()
    dup = good.replace("id,split,", "id,split,id,", 1).replace(",train,", ",x,train,")
    csv_path.write_text(dup, newline="")
    with pytest.raises(AnnotationError, match=r"ann\.csv, line 1: column 'id' appears twice"):
        start_annotation_server(csv_path, "cmd", 0)
    csv_path.write_text(good, newline="")
    with serving(csv_path) as (_, server):
        csv_path.write_text(dup, newline="")  # made ambiguous while the page is open
        status, body = answer(server, 0, 1)
        assert status == 409 and b"column 'id' appears twice" in body
        assert csv_path.read_bytes().decode() == dup  # untouched
        assert http(server, "GET", "/api/state")[0] == 409


# ---------------------------------------------------------------- hostile requests
_BAD_REQUESTS = {
    "bad JSON": (b'POST /api/answer HTTP/1.1\r\nContent-Type: application/json\r\n'
                 b'Content-Length: 9\r\n\r\n{"index":', 400, b"not valid JSON"),
    "nested JSON": (b"[" * 4000 + b"]" * 4000, 400, b"not valid JSON"),
    "JSON true": (b'{"index": 0, "annotation": true}', 400, b"got true"),
    "JSON false": (b'{"index": 0, "annotation": false}', 400, b"got false"),
    "label 2": (b'{"index": 0, "annotation": 2}', 400, b"got 2"),
    "float label": (b'{"index": 0, "annotation": 1.0}', 400, b"got 1.0"),
    "string label": (b'{"index": 0, "annotation": "1"}', 400, b'got \\"1\\"'),
    "index true": (b'{"index": true, "annotation": 1}', 400, b"index must be a JSON integer"),
    "index out of range": (b'{"index": 3, "annotation": 1}', 400, b"no item 3"),
    "not an object": (b"[0, 1]", 400, b"send a JSON object"),
    "non-UTF-8 body": (b'{"index": 0, "annotation": 1, "id": "\xff"}', 400, b"not valid JSON"),
    "id not a string": (b'{"index": 0, "annotation": 1, "id": 7}', 400, b"id must be a string"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AnnotationServer, Path]]:
    csv_path = _request(tmp_path_factory.mktemp("hostile") / "ann.csv")
    with serving(csv_path) as (_, server):
        yield server, csv_path


def _still_fine(server: AnnotationServer, csv_path: Path, before: bytes) -> None:
    assert csv_path.read_bytes() == before  # nothing was written
    assert state(server) == [None, None, None]  # and the server still answers


@pytest.mark.parametrize("case", sorted(_BAD_REQUESTS))
def test_a_malformed_answer_gets_a_4xx_with_a_reason(hostile, case: str) -> None:
    server, csv_path = hostile
    before = csv_path.read_bytes()
    payload, expected, reason = _BAD_REQUESTS[case]
    if payload.startswith(b"POST "):
        port = server.server_address[1]
        status, body = raw(server, payload.replace(b"HTTP/1.1\r\n",
                                                   f"HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                                   .encode(), 1))
    else:
        status, body = http(server, "POST", "/api/answer", payload)
    assert status == expected and reason in body, (status, body)
    _still_fine(server, csv_path, before)


@pytest.mark.parametrize(("length", "expected", "reason"), [
    ("-1", 400, b"non-negative integer"),
    ("99999999999999999999999", 413, b"at most 10000"),
    ("9" * 101, 400, b"non-negative integer"),
    (str(MAX_BODY + 1), 413, b"at most 10000"),
    ("10" + "0" * 17, 413, b"at most 10000"),
    ("abc", 400, b"non-negative integer"),
    ("1e3", 400, b"non-negative integer"),
    (None, 411, b"send a Content-Length"),
])
def test_the_body_cap_holds_for_any_content_length(hostile, length: str | None, expected: int,
                                                    reason: bytes) -> None:
    server, csv_path = hostile
    before = csv_path.read_bytes()
    port = server.server_address[1]
    head = (f"POST /api/answer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\n"
            + (f"Content-Length: {length}\r\n" if length is not None else "") + "\r\n")
    # The body says "answer 1"; none of it may be read as an answer.
    status, body = raw(server, head.encode() + b'{"index": 0, "annotation": 1}')
    assert status == expected and reason in body, (status, body)
    _still_fine(server, csv_path, before)


def test_two_differing_content_lengths_are_refused(hostile) -> None:
    server, csv_path = hostile
    before = csv_path.read_bytes()
    status, body = http(server, "POST", "/api/answer", b'{"index": 0, "annotation": 1}',
                        headers={"Content-Length": "29\r\nContent-Length: 5"})
    assert status == 400 and b"one non-negative integer" in body
    _still_fine(server, csv_path, before)


@pytest.mark.parametrize(("request_line", "expected"), [
    (b"GET /overlay/\xb2 HTTP/1.1", 404),  # latin-1 superscript two: str.isdigit() says yes
    (b"GET /overlay/\xff\xfe HTTP/1.1", 404),
    (b"GET /\xc3\x28 HTTP/1.1", 404),
    (b"GET /overlay/\xd9\xa3 HTTP/1.1", 404),  # Arabic-Indic digit three, UTF-8
    (b"GET /overlay/99999999999999999999 HTTP/1.1", 404),
    (b"GET /nope HTTP/1.1", 404),
    (b"GET /api/state/../../ann.csv HTTP/1.1", 404),
    (b"POST /api/nope HTTP/1.1", 404),
    (b"PUT /api/answer HTTP/1.1", 405),
    (b"DELETE / HTTP/1.1", 405),
    (b"PATCH /api/answer HTTP/1.1", 405),
    (b"FROB / HTTP/1.1", 405),
    (b"GET\xff / HTTP/1.1", 405),
    (b"GARBAGE", 400),
])
def test_odd_paths_and_methods_get_a_4xx(hostile, request_line: bytes, expected: int) -> None:
    server, csv_path = hostile
    before = csv_path.read_bytes()
    port = server.server_address[1]
    status, _ = raw(server, request_line + f"\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert status == expected
    _still_fine(server, csv_path, before)


def test_head_gets_405_without_a_body(hostile) -> None:
    server, csv_path = hostile
    status, body = http(server, "HEAD", "/")
    assert status == 405 and body == b""
    _still_fine(server, csv_path, csv_path.read_bytes())


def test_the_page_saves_a_good_answer_after_all_that(tmp_path: Path) -> None:
    csv_path = _request(tmp_path / "ann.csv")
    with serving(csv_path) as (_, server):
        for payload, *_ in _BAD_REQUESTS.values():
            if not payload.startswith(b"POST "):
                assert http(server, "POST", "/api/answer", payload)[0] // 100 == 4
        status, body = answer(server, 1, 0, id="b")
        assert status == 200 and json.loads(body)["items"][1]["annotation"] == 0
        assert http(server, "GET", "/overlay/1")[1] == PNG
    with pytest.raises(AnnotationError, match=r"line 2: id 'a' has no annotation; 2 of 3"):
        read_annotations(csv_path, IDS)  # only b was answered
    assert csv_path.read_text().splitlines()[2].endswith(",0")


# ---------------------------------------------------------------- the printed commands
def test_the_printed_commands_carry_every_override_quoted(tmp_path: Path) -> None:
    csv_path = tmp_path / "my answers.csv"
    overrides = ["targets=[Odd]", "slim.retrain=last_layer",
                 "search.space={slim.curated_size: {int: [60, 180]}}", "name=it's mine"]
    command = sweep_command("sweeps/slim synthetic.yaml", overrides, csv_path)
    argv = shlex.split(command)
    python = interpreter()  # the interpreter running this, as a person would type it here
    assert argv[:3] == [python, "launch.py", "sweeps/slim synthetic.yaml"]
    assert argv[3:] == [a for o in [*overrides, f"slim.annotations={csv_path}"]
                        for a in ("--set", o)]
    given = [*overrides, f"slim.annotations = {csv_path}"]  # already set: not twice
    assert shlex.split(sweep_command("s.yaml", given, csv_path))[3:] == [
        a for o in given for a in ("--set", o)]
    again = shlex.split(annotate_command("s.yaml", overrides))
    assert again == [python, "launch.py", "s.yaml",
                     *(a for o in overrides for a in ("--set", o)), "--annotate"]
