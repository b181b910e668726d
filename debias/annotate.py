"""`launch.py SWEEP --annotate`: SLIM's human step as a small local web page.

The page works on the annotation request CSV (``slim.annotations``). If it does not exist
yet it is built first by the code path a SLIM trial uses (:class:`debias.methods.slim.SLIM`'s
``prepare``: the cached ERM reference model, the cached GradCAM attention, the same sampling),
which writes the request and its overlay PNGs and stops with an AnnotationError.

The page shows one sampled image at a time (its overlay: image | GradCAM | most attended
region), asks whether the attention is on the core object, and takes 1 / 0 / -1 (unsure) by
button or key. Every answer is written to the CSV at once (temp file + ``os.replace``), so a
closed browser loses nothing; reopening resumes at the first unanswered image. When all are
answered it shows the command that runs the sweep with them.

The server binds 127.0.0.1 only, serves overlay PNGs from the request's overlay folder only
(looked up by row number, never by a path from the request), and takes answers only as JSON
from its own host name (no cross-site form posts, no DNS rebinding).
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from debias.files import atomic_write_text
from debias.slim.annotations import (
    ALLOWED_LABELS,
    COLUMNS,
    AnnotationError,
    read_request_rows,
    request_splits,
    write_annotation_request,
)
from debias.spec import Spec, with_params
from debias.ui import HOST, free_port, stop_signals_as_interrupt

__all__ = ["AnnotationServer", "AnnotationStore", "ensure_request", "missing_request_splits",
           "run_annotate", "start_annotation_server", "stop_annotation_server", "sweep_command"]

DEFAULT_PORT = 8765
_REQUIRED = ("id", "label_class", "overlay_path", "annotation")


class AnnotationStore:
    """The request CSV in memory; :meth:`answer` rewrites the file atomically each time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.overlay_dir = self.path.with_name(f"{self.path.stem}_overlays").resolve()
        self._lock = threading.Lock()
        with self.path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            self.header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = self.header
            self.rows = [dict(row) for row in reader]
        missing = [c for c in _REQUIRED if c not in self.header]
        if missing:
            raise AnnotationError(f"{self.path}: missing column(s) {', '.join(missing)}; the "
                                  f"annotation page needs the request CSV ({', '.join(COLUMNS)})"
                                  " as the sweep writes it")
        if not self.rows:
            raise AnnotationError(f"{self.path}: the request has no rows")

    @staticmethod
    def _label(text: str | None) -> int | None:
        try:
            value = int((text or "").strip())
        except ValueError:
            return None
        return value if value in ALLOWED_LABELS else None

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"index": i, "id": row["id"], "label_class": row.get("label_class", ""),
                     "annotation": self._label(row.get("annotation"))}
                    for i, row in enumerate(self.rows)]

    def answer(self, index: int, label: int) -> None:
        if label not in ALLOWED_LABELS:
            raise ValueError(f"annotation must be one of {ALLOWED_LABELS}, got {label!r}")
        if not 0 <= index < len(self.rows):
            raise IndexError(f"no item {index}; the request has {len(self.rows)}")
        with self._lock:
            previous = self.rows[index].get("annotation", "")
            self.rows[index]["annotation"] = str(label)
            try:
                self._write()
            except BaseException:
                self.rows[index]["annotation"] = previous
                raise

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def overlay(self, index: int) -> Path | None:
        """The overlay PNG of row ``index`` if it lies inside the request's overlay folder
        (a folder moved together with its CSV is found by file name)."""
        if not 0 <= index < len(self.rows):
            return None
        stored = Path(self.rows[index].get("overlay_path") or "")
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


class _Handler(BaseHTTPRequestHandler):
    server: AnnotationServer

    def log_message(self, format: str, *args: Any) -> None:
        del format, args  # quiet: the terminal shows the URL and progress only

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").lower()
        port = self.server.server_address[1]
        return host in (f"127.0.0.1:{port}", f"localhost:{port}")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _state(self) -> dict[str, Any]:
        s = self.server
        return {"items": s.store.items(), "command": s.command, "csv": str(s.store.path),
                "sweep": s.title, "target": s.target}

    def do_GET(self) -> None:
        if not self._host_ok():
            self._send(HTTPStatus.FORBIDDEN, b"forbidden host", "text/plain")
            return
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self._state())
        elif path.startswith("/overlay/") and path[len("/overlay/"):].isdigit():
            found = self.server.store.overlay(int(path[len("/overlay/"):]))
            if found is None:
                self._send(HTTPStatus.NOT_FOUND, b"no such overlay", "text/plain")
            else:
                self._send(HTTPStatus.OK, found.read_bytes(), "image/png")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

    def do_POST(self) -> None:
        if not self._host_ok():
            self._send(HTTPStatus.FORBIDDEN, b"forbidden host", "text/plain")
            return
        if self.path != "/api/answer":
            self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            return
        # JSON only: a cross-site page cannot send it without a CORS preflight we never grant.
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(min(length, 10_000)) or b"{}")
            index, label = body["index"], body["annotation"]
            if not isinstance(index, int) or not isinstance(label, int):
                raise TypeError("index and annotation must be integers")
            self.server.store.answer(index, label)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except OSError as exc:
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                       {"error": f"could not save {self.server.store.path}: {exc}"})
            return
        self.server.on_answer(self.server.store)
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


def start_annotation_server(csv_path: str | Path, command: str, port: int | None = None,
                            title: str = "", target: str = "") -> tuple[str, AnnotationServer]:
    """Serve the annotation page for ``csv_path`` on 127.0.0.1 in a background thread;
    returns (URL, server for :func:`stop_annotation_server`). ``port`` 0/None: a free one."""
    store = AnnotationStore(csv_path)
    server = AnnotationServer(store, command, port or 0, title=title, target=target)
    server.thread = threading.Thread(target=server.serve_forever, name="annotation-page",
                                     daemon=True)
    server.thread.start()
    return server.url, server


def stop_annotation_server(server: AnnotationServer) -> None:
    server.shutdown()
    server.server_close()
    if server.thread is not None:
        server.thread.join(timeout=10)


def _needed_splits(spec: Spec) -> dict[str, str]:
    """{split: retrain mode} for every retrain mode the sweep can take."""
    from debias.slim.modes import MODE_SPLITS

    return {MODE_SPLITS[mode]: mode for mode in sorted(spec.values_of("slim.retrain"))}


def missing_request_splits(spec: Spec) -> list[str]:
    """Splits the sweep needs answers for that the annotation file has no rows of (all of
    them while the file does not exist). Reads the CSV only: cheap enough for a dry run."""
    path = Path(spec.config["slim"]["annotations"])
    have = request_splits(path) if path.is_file() else set()
    return [split for split in _needed_splits(spec) if split not in have]


def ensure_request(spec: Spec) -> tuple[Path, int]:
    """(the sweep's request CSV, how many rows were just written to it). Rows are built for
    the first target and for every retrain mode the sweep can take whose split the file
    lacks (each row names its split): a missing file is created, and a file from a sweep
    that has since added a mode gets that mode's rows, the answers already in it kept."""
    if spec.method != "slim":
        raise AnnotationError(f"--annotate is SLIM's annotation step; sweep {spec.name!r} "
                              f"uses method {spec.method!r}")
    slim = spec.config["slim"]
    if slim.get("annotator") != "csv" or not slim.get("annotations"):
        raise AnnotationError(
            f"sweep {spec.name!r} has slim.annotator {slim.get('annotator')!r}; annotating by "
            "hand needs --set slim.annotator=csv --set slim.annotations=PATH.csv")
    if len(spec.targets) > 1:
        print(f"note: slim.annotations is one file but the sweep has {len(spec.targets)} "
              f"targets; the request is for the first, {spec.targets[0]!r} (annotate the others "
              "with --set targets=[T] --set slim.annotations=OTHER.csv)", file=sys.stderr)
    path = Path(slim["annotations"])
    missing = missing_request_splits(spec)
    if not missing:
        return path, 0
    import torch

    from debias.cache import StageCache
    from debias.data import load_grouped
    from debias.slim.modes import annotation_request_rows

    target = spec.targets[0]
    base = spec.trial_base(target)
    modes = [_needed_splits(spec)[split] for split in missing]
    print(f"building the annotation request for target {target!r}, retrain mode(s) "
          f"{', '.join(modes)} (ERM reference model and GradCAM from the stage cache, computed "
          "first if absent) ...", flush=True)
    data = load_grouped(base["dataset"], target, base["bias"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cache = StageCache(base["cache_dir"])
    rows = [row for mode in modes for row in annotation_request_rows(
        with_params(base, {"slim.retrain": mode}), data, cache, device, path)]
    kept = read_request_rows(path) if path.is_file() else []
    write_annotation_request(path, [*kept, *rows])
    return path, len(rows)


def sweep_command(sweep: str, overrides: Sequence[str], csv_path: Path) -> str:
    """``python launch.py SWEEP [--set ...]``: the overrides given to --annotate, plus
    ``--set slim.annotations=CSV`` where the sweep file alone does not pin the path (it is
    absent, or comes from an environment variable)."""
    args = [sweep]
    for item in overrides:
        args += ["--set", item]
    if not any(o.split("=", 1)[0].strip() == "slim.annotations" for o in overrides):
        raw = _raw_annotations(sweep)
        if raw is None or "$" in raw:
            args += ["--set", f"slim.annotations={csv_path}"]
    return "python launch.py " + shlex.join(args)


def _raw_annotations(sweep: str) -> str | None:
    import yaml

    try:
        raw = yaml.safe_load(Path(sweep).read_text())
        value = raw["slim"]["annotations"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


def run_annotate(spec: Spec, sweep: str, overrides: Sequence[str],
                 port: int | None = None) -> int:
    """The ``--annotate`` command: build the request if needed, serve the page until
    Ctrl-C (or SIGTERM)."""
    from debias.data import DatasetError

    try:
        csv_path, _ = ensure_request(spec)
        chosen = free_port(DEFAULT_PORT if port is None else port)
        if port and chosen != port:
            print(f"error: port {port} on {HOST} is in use; pick another with --port",
                  file=sys.stderr)
            return 1
        command = sweep_command(sweep, overrides, csv_path)
        url, server = start_annotation_server(csv_path, command, chosen, title=spec.name,
                                              target=spec.targets[0])
    except (AnnotationError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def progress(store: AnnotationStore) -> None:
        items = store.items()
        done = sum(item["annotation"] is not None for item in items)
        print(f"saved: {done} of {len(items)} answered", flush=True)
        if done == len(items):
            print(f"all answered; run the sweep with:\n  {command}", flush=True)

    server.on_answer = progress
    with stop_signals_as_interrupt():
        try:
            print(f"annotation page for {csv_path}:\n  {url}\nanswers are saved to the CSV as "
                  "you go; Ctrl-C stops the page.", flush=True)
            while True:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\nstopping the annotation page", flush=True)
            return 0
        finally:
            stop_annotation_server(server)


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
      body: JSON.stringify({index: index, annotation: label})});
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
    applyState(await r.json());
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
