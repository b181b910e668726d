"""SLIM's annotation page: a small HTTP server on 127.0.0.1 over one request CSV.

The page shows one sampled image at a time (its overlay: image | GradCAM | most attended
region), asks whether the attention is on the core object, and takes 1 / 0 / -1 (unsure) by
button or key. Every answer is saved to the CSV at once through
:class:`~debias.slim.annotation_store.AnnotationStore` (a fresh read, one cell changed, an
atomic rewrite), so a closed browser loses nothing and reopening resumes at the first
unanswered image. When all are answered it shows the command that runs the sweep with them.
One page per CSV: the store holds ``<csv>.lock`` while the server lives, and a second
server on the same CSV is refused with the first one's URL.

What the server accepts, and nothing else: ``GET /``, ``GET /api/state``,
``GET /overlay/N`` (the overlay of row N, from the request's overlay folder only, never a
path from the request), ``POST /api/answer`` with a JSON object
``{"index": N, "id": "...", "annotation": 1 | 0 | -1}`` of at most 10 kB, from its own host
name (no cross-site form posts, no DNS rebinding). Every other request gets a 4xx status
with a one-line reason: a missing, negative, non-numeric or oversized ``Content-Length``
(411 / 400 / 413, the body never read past the cap), JSON that does not parse or nests too
deeply, a bool, float or string where an integer belongs, an unknown path or method.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from debias.slim.annotation_store import AnnotationStore
from debias.slim.annotations import ALLOWED_LABELS, AnnotationError
from debias.ui import HOST

__all__ = ["MAX_BODY", "AnnotationServer", "start_annotation_server", "stop_annotation_server"]

#: The largest request body read, in bytes (an answer is about 60).
MAX_BODY = 10_000
_OVERLAY = re.compile(r"/overlay/([0-9]{1,9})")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,100}")  # int() of more digits is slow


class _Refused(Exception):
    """A request answered with a 4xx status and a one-line reason."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Handler(BaseHTTPRequestHandler):
    server: AnnotationServer
    #: Seconds a client may take to send its request; then it gets 408 (or is closed, if it
    #: never sent a request line), so a stalled client cannot hold a thread forever.
    timeout = 10
    #: Answer even a garbled request line with a status line (the base class would answer
    #: in HTTP/0.9: a bare body, which clients take for a dropped connection).
    default_request_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        del format, args  # quiet: the terminal shows the URL and progress only

    def __getattr__(self, name: str) -> Any:
        # Any method but GET and POST (PUT, HEAD, made-up ones): 405, where the base class
        # would answer 501, a server error, for what is the client's mistake.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, POST")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        self._json(status, {"error": reason})

    def _respond(self, work: Callable[[], None]) -> None:
        """Run one request's handler: a refusal becomes its 4xx, anything unexpected a 500
        with a short reason (and one line in the terminal), never a traceback."""
        try:
            work()
        except _Refused as refused:
            self._refuse(refused.status, refused.reason)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nobody to answer
        except Exception as exc:
            print(f"annotation page: {self.command} {self.path[:100]!r} failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            try:
                self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR,
                             f"internal error ({type(exc).__name__}); see the terminal")
            except OSError:
                self.close_connection = True

    def _not_allowed(self) -> None:
        self._respond(lambda: self._refuse(HTTPStatus.METHOD_NOT_ALLOWED,
                                           f"method {self.command[:20]!r} not allowed; "
                                           "the page uses GET and POST"))

    def _check_host(self) -> None:
        host = (self.headers.get("Host") or "").lower()
        port = self.server.server_address[1]
        if host not in (f"127.0.0.1:{port}", f"localhost:{port}"):
            raise _Refused(HTTPStatus.FORBIDDEN, "forbidden host")

    def _state(self) -> dict[str, Any]:
        s = self.server
        try:
            items = s.store.items()
        except AnnotationError as exc:  # the file was made unreadable meanwhile
            raise _Refused(HTTPStatus.CONFLICT, str(exc)) from None
        return {"items": items, "command": s.command, "csv": str(s.store.path),
                "sweep": s.title, "target": s.target}

    def do_GET(self) -> None:
        self._respond(self._get)

    def do_POST(self) -> None:
        self._respond(self._post)

    def _get(self) -> None:
        self._check_host()
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self._state())
        elif (match := _OVERLAY.fullmatch(path)) is not None:
            try:
                found = self.server.store.overlay(int(match.group(1)))
            except AnnotationError:
                found = None
            if found is None:
                raise _Refused(HTTPStatus.NOT_FOUND, "no such overlay")
            self._send(HTTPStatus.OK, found.read_bytes(), "image/png")
        else:
            raise _Refused(HTTPStatus.NOT_FOUND, "not found")

    def _body(self) -> bytes:
        """The request body, read only up to :data:`MAX_BODY` whatever the headers say."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not lengths:
            raise _Refused(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
        if len(lengths) > 1 or not _CONTENT_LENGTH.fullmatch(raw := lengths.pop()):
            raise _Refused(HTTPStatus.BAD_REQUEST,
                           "Content-Length must be one non-negative integer")
        length = int(raw)
        if length > MAX_BODY:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {length} bytes; at most {MAX_BODY}")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise _Refused(HTTPStatus.REQUEST_TIMEOUT, "the body did not arrive") from None
        if len(body) != length:
            raise _Refused(HTTPStatus.BAD_REQUEST, "the body is shorter than its Content-Length")
        return body

    def _post(self) -> None:
        self._check_host()
        if self.path != "/api/answer":
            raise _Refused(HTTPStatus.NOT_FOUND, "not found")
        # JSON only: a cross-site page cannot send it without a CORS preflight we never grant.
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            raise _Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        body = self._body()
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # bad syntax, bad UTF-8, nesting too deep
            raise _Refused(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise _Refused(HTTPStatus.BAD_REQUEST,
                           'send a JSON object {"index": N, "annotation": 1 | 0 | -1}')
        index, label, sample_id = payload.get("index"), payload.get("annotation"), \
            payload.get("id")
        if type(index) is not int:
            raise _Refused(HTTPStatus.BAD_REQUEST,
                           f"index must be a JSON integer, got {_shown(index)}")
        if type(label) is not int or label not in ALLOWED_LABELS:
            raise _Refused(HTTPStatus.BAD_REQUEST, "annotation must be the JSON integer 1, 0 "
                           f"or -1, got {_shown(label)}")
        if sample_id is not None and not isinstance(sample_id, str):
            raise _Refused(HTTPStatus.BAD_REQUEST, f"id must be a string, got {_shown(sample_id)}")
        store = self.server.store
        try:
            store.answer(index, label, sample_id)
        except IndexError as exc:
            raise _Refused(HTTPStatus.BAD_REQUEST, str(exc)) from None
        except AnnotationError as exc:  # AnswerConflict, or the file made unreadable
            raise _Refused(HTTPStatus.CONFLICT, str(exc)) from None
        except OSError as exc:
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR,
                         f"could not save {store.path}: {exc.strerror or exc}")
            return
        self.server.on_answer(store)
        self._json(HTTPStatus.OK, self._state())


class AnnotationServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: AnnotationStore, command: str, port: int, title: str = "",
                 target: str = "") -> None:
        super().__init__((HOST, port), _Handler)
        self.store = store
        self.command = command
        self.title = title
        self.target = target
        self.thread: threading.Thread | None = None
        #: Called after every saved answer (the CLI prints progress).
        self.on_answer: Callable[[AnnotationStore], None] = lambda store: None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # What the handler did not answer itself (a client that vanished mid-request): one
        # line, not socketserver's traceback.
        exc = sys.exc_info()[1]
        print(f"annotation page: a request from {client_address[0]} failed: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def start_annotation_server(csv_path: str | Path, command: str, port: int | None = None,
                            title: str = "", target: str = "") -> tuple[str, AnnotationServer]:
    """Serve the annotation page for ``csv_path`` on 127.0.0.1 in a background thread;
    returns (URL, server for :func:`stop_annotation_server`). ``port`` 0/None: a free one.
    Raises AnnotationError when another page serves the same CSV (naming its URL), when the
    CSV is not a readable request, or when the port cannot be bound."""
    store = AnnotationStore(csv_path)
    try:
        server = AnnotationServer(store, command, port or 0, title=title, target=target)
    except OSError as exc:
        store.close()
        raise AnnotationError(f"cannot serve the annotation page on {HOST}:{port}: "
                              f"{exc.strerror or exc}; pick another port with --port") from None
    store.announce(server.url)
    server.thread = threading.Thread(target=server.serve_forever, name="annotation-page",
                                     daemon=True)
    server.thread.start()
    return server.url, server


def stop_annotation_server(server: AnnotationServer) -> None:
    """Stop serving and let the CSV go (another page may then start on it)."""
    server.shutdown()
    server.server_close()
    if server.thread is not None:
        server.thread.join(timeout=10)
    server.store.close()


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SLIM annotation</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
  main { max-width: 980px; margin: 0 auto; padding: 16px 24px; }
  header { display: flex; justify-content: space-between; align-items: baseline; }
  h1 { font-size: 1.2rem; margin: 0; }
  #progress { font-weight: 600; }
  .bar { height: 6px; background: #ddd; border-radius: 3px; margin: 8px 0 16px; }
  .bar > div { height: 100%; background: #3a7d44; border-radius: 3px; width: 0; }
  figure { margin: 0; background: #fff; padding: 12px; border-radius: 8px; text-align: center; }
  #overlay { max-width: 100%; min-height: 160px; image-rendering: pixelated; }
  figcaption { color: #666; font-size: .85rem; margin-top: 6px; }
  .question { font-size: 1.1rem; margin: 16px 0 8px; }
  .answers button, .nav button { font-size: 1rem; padding: 10px 16px; margin: 4px 6px 4px 0;
    border: 2px solid #888; border-radius: 6px; background: #fff; cursor: pointer; }
  .answers button.chosen { border-color: #1d5fbf; background: #dce8fb; font-weight: 600; }
  kbd { border: 1px solid #aaa; border-radius: 3px; padding: 0 4px; font-size: .85em; }
  #status { min-height: 1.4em; color: #3a7d44; }
  #status.error { color: #b00020; font-weight: 600; }
  #done { display: none; background: #e7f4e9; border: 1px solid #3a7d44; border-radius: 8px;
    padding: 12px 16px; margin-top: 16px; }
  #command { white-space: pre-wrap; word-break: break-all; background: #fff; padding: 8px;
    user-select: all; }
  .meta { color: #555; }
</style>
</head>
<body>
<main>
  <header>
    <h1>SLIM annotation <span id="title" class="meta"></span></h1>
    <span id="progress">loading...</span>
  </header>
  <div class="bar"><div id="bar"></div></div>
  <div id="item">
    <div class="meta">image <span id="position"></span> &middot; id <code id="sample-id"></code>
      &middot; class <code id="label-class"></code></div>
    <figure>
      <img id="overlay" alt="GradCAM overlay">
      <figcaption>left: the image &middot; middle: the reference model's GradCAM attention
        &middot; right: the most attended region</figcaption>
    </figure>
    <p class="question">Is the model's attention (the hot region) on the <b>core object</b>
      that defines the class, rather than on the background or other context?</p>
    <div class="answers">
      <button id="btn-yes" data-answer="1">On the core object <kbd>1</kbd></button>
      <button id="btn-no" data-answer="0">Not on it <kbd>0</kbd></button>
      <button id="btn-unsure" data-answer="-1">Unsure <kbd>U</kbd></button>
    </div>
    <div class="nav">
      <button id="btn-back">&larr; Back</button>
      <button id="btn-next">Next &rarr;</button>
      <span class="meta">keys: <kbd>1</kbd> <kbd>0</kbd> <kbd>U</kbd> answer,
        <kbd>&larr;</kbd> <kbd>&rarr;</kbd> move</span>
    </div>
    <div id="status"></div>
  </div>
  <div id="done">
    <p><b>All images are annotated.</b> The answers are in <code id="csv"></code>.
      Go back to change any of them, or start the SLIM sweep with:</p>
    <pre id="command"></pre>
  </div>
</main>
<script>
"use strict";
let items = [], current = 0, busy = false;
const $ = (id) => document.getElementById(id);

function answered() { return items.filter((it) => it.annotation !== null).length; }
function firstOpen(from) {
  for (let k = 0; k < items.length; k++) {
    const i = (from + k) % items.length;
    if (items[i].annotation === null) return i;
  }
  return -1;
}
function applyState(state) {
  items = state.items;
  $("title").textContent = state.sweep ? "— " + state.sweep +
    (state.target ? " / " + state.target : "") : "";
  $("command").textContent = state.command;
  $("csv").textContent = state.csv;
}
function render() {
  const n = answered(), total = items.length, it = items[current];
  $("progress").textContent = n + " of " + total + " answered";
  $("bar").style.width = (total ? 100 * n / total : 0) + "%";
  $("position").textContent = (current + 1) + " of " + total;
  $("sample-id").textContent = it.id;
  $("label-class").textContent = it.label_class;
  const src = "/overlay/" + current;
  if ($("overlay").getAttribute("src") !== src) $("overlay").setAttribute("src", src);
  for (const b of document.querySelectorAll(".answers button")) {
    b.classList.toggle("chosen", Number(b.dataset.answer) === it.annotation);
  }
  $("btn-back").disabled = current === 0;
  $("btn-next").disabled = current === total - 1;
  $("done").style.display = n === total ? "block" : "none";
  document.body.dataset.index = String(current);
  document.body.dataset.answered = String(n);
}
function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}
async function answer(label) {
  if (busy || !items.length) return;
  busy = true;
  const index = current;
  try {
    const r = await fetch("/api/answer", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({index: index, id: items[index].id, annotation: label})});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    applyState(body);
    status("saved image " + (index + 1) + ": " + label, false);
    const next = firstOpen(index + 1);
    if (next >= 0) current = next;
    render();
  } catch (e) {
    status("NOT saved: " + e.message + " (is the annotation server still running?)", true);
  } finally {
    busy = false;
  }
}
function move(delta) {
  const i = current + delta;
  if (i >= 0 && i < items.length) { current = i; status("", false); render(); }
}
async function load() {
  try {
    const r = await fetch("/api/state");
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    applyState(body);
  } catch (e) {
    status("could not load the request: " + e.message, true);
    return;
  }
  const open = firstOpen(0);
  current = open >= 0 ? open : items.length - 1;
  render();
  document.body.dataset.ready = "1";
}
for (const b of document.querySelectorAll(".answers button")) {
  b.addEventListener("click", () => answer(Number(b.dataset.answer)));
}
$("btn-back").addEventListener("click", () => move(-1));
$("btn-next").addEventListener("click", () => move(1));
document.addEventListener("keydown", (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const keys = {"1": 1, "y": 1, "0": 0, "n": 0, "u": -1, "?": -1};
  const k = e.key.toLowerCase();
  if (k in keys) { e.preventDefault(); answer(keys[k]); }
  else if (e.key === "ArrowLeft") { e.preventDefault(); move(-1); }
  else if (e.key === "ArrowRight") { e.preventDefault(); move(1); }
});
load();
</script>
</body>
</html>
"""
