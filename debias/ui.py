"""`launch.py SWEEP --ui`: the MLflow UI on the sweep's tracking store, on 127.0.0.1 only.

For a ``sqlite:///`` store an ``mlflow server`` subprocess is started in its own process group
(so stopping it also stops its uvicorn/gunicorn workers), the experiment's URL is printed, and
the server runs until Ctrl-C. For an ``http(s)://`` tracking URI a server already exists: its
URL is printed and nothing is started.

The URL opens on the comparison. MLflow 3 keeps a runs table's columns, sort and filter in
page state (the browser's local storage), never in a plain URL; what a URL can carry is a
*shared view*: ``viewStateShareKey=KEY`` names the experiment tag
``mlflow.sharedViewState.KEY`` holding that state as JSON (the search facets
``searchFilter`` / ``orderByKey`` / ``orderByAsc`` and the UI state ``selectedColumns`` /
``columnWidths``; MLflow's ``useSharedExperimentViewState``). :func:`save_comparison_view`
writes that tag: the parents' ``report/*`` metrics and their method, target and bias tags as
columns, trial runs filtered out, sorted by test WGA, best first.

Tests use :func:`start_ui` / :func:`stop_ui` directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["COMPARISON_COLUMNS", "COMPARISON_VIEW", "UIError", "UIHandle", "comparison_url",
           "comparison_view", "experiment_url", "free_port", "run_ui", "save_comparison_view",
           "start_ui", "stop_ui"]

HOST = "127.0.0.1"
DEFAULT_PORT = 5000
SQLITE = "sqlite:///"

#: The share key of the comparison view (the experiment tag ``mlflow.sharedViewState.<key>``).
COMPARISON_VIEW = "debias-comparison"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
SORT_METRIC = "report/test_wga_mean"
#: The runs table's columns, in order, as MLflow's canonical keys (``metrics.`name```): what
#: a row is (method, target, bias), then its numbers (the CIs are 95% half-widths).
COMPARISON_COLUMNS = (
    *(f"tags.`{t}`" for t in ("method", "target_attribute", "bias_attribute")),
    *(f"metrics.`report/{m}`" for m in ("test_wga_mean", "test_wga_ci95", "delta_wga_vs_erm",
                                         "delta_wga_vs_erm_ci95", "test_avg_mean")),
)
#: The grid's own columns that stay in front (row selection, run name) and after them.
_LEADING = ("0", "attributes.`Run Name`")
_TRAILING = ("runDateAndNestInfo", "duration")


class UIError(RuntimeError):
    """The UI could not be started; the message says why and where its log is."""


@dataclass
class UIHandle:
    """A running ``mlflow server``: its process (leader of its own process group) and log."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_port(preferred: int | None = None, host: str = HOST) -> int:
    """``preferred`` if it can be bound on ``host``, otherwise a free ephemeral port."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As servers do: a port whose old connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise UIError(f"no free port on {host}")  # pragma: no cover - bind(0) does not fail


def experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table. MLflow 3's UI opens a bare ``#/experiments/ID`` as a GenAI
    traces overview; the ``runs`` tab with ``workflowType=machine_learning`` shows the runs."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning")


def comparison_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table opened on the comparison view (see the module doc)."""
    return f"{experiment_url(base_url, experiment_id)}&viewStateShareKey={COMPARISON_VIEW}"


def comparison_view() -> dict[str, object]:
    """The runs table's state that compares the sweep's pipelines: parents (and the study
    run) only, the report's numbers and the method/target/bias tags as columns, sorted by
    test worst-group accuracy, best first."""
    return {
        "searchFilter": "tags.`debias.role` != 'trial'",
        "orderByKey": f"metrics.`{SORT_METRIC}`",
        "orderByAsc": False,
        "selectedColumns": list(COMPARISON_COLUMNS),
        # Widths apply to the columns ordered here (MLflow applies both together): wide
        # enough for the metrics' names, which say what each number is.
        "columnOrder": [*_LEADING, *COMPARISON_COLUMNS, *_TRAILING],
        "columnWidths": {c: 190 if c.startswith("metrics.") else 125
                         for c in COMPARISON_COLUMNS},
        "runsExpanded": {},
    }


def save_comparison_view(tracking_uri: str, experiment_id: str) -> None:
    """Write the comparison view onto the experiment (a tag; idempotent), so
    :func:`comparison_url` opens on it in any browser."""
    import json

    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_experiment_tag(
        experiment_id, VIEW_TAG_PREFIX + COMPARISON_VIEW, json.dumps(comparison_view()))


def _experiment_id(tracking_uri: str, experiment: str) -> str:
    from mlflow.tracking import MlflowClient

    from debias.environment import redact_uri

    found = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    if found is None:
        raise UIError(f"no MLflow experiment {experiment!r} in {redact_uri(tracking_uri)}; "
                      "run the sweep first")
    return str(found.experiment_id)


def _absolute_sqlite(uri: str) -> tuple[str, Path]:
    path = Path(uri[len(SQLITE):]).expanduser()
    if not path.is_absolute():
        path = path.resolve()
    return SQLITE + str(path), path


def _wait_ready(handle: UIHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise UIError(f"mlflow server exited with code {handle.process.returncode} before "
                          f"it answered; its log: {handle.log_path}\n{_tail(handle.log_path)}")
        try:
            with urllib.request.urlopen(f"{handle.base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise UIError(f"mlflow server did not answer on {handle.base_url} within {timeout:.0f}s; "
                  f"its log: {handle.log_path}\n{_tail(handle.log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_ui(tracking_uri: str, experiment: str, port: int | None = None,
             timeout: float = 120.0) -> tuple[str, UIHandle]:
    """Start ``mlflow server`` for a ``sqlite:///`` store on 127.0.0.1 and wait until it
    answers; returns (URL of ``experiment``'s page, handle for :func:`stop_ui`).

    ``port`` None picks 5000 if free, else any free port; 0 any free port; another port
    must be free.
    """
    if not tracking_uri.startswith(SQLITE):
        raise UIError(f"start_ui serves sqlite:/// stores only, got {tracking_uri.split(':')[0]}:"
                      " (an http(s):// tracking URI is already a UI: open it in a browser)")
    uri, db = _absolute_sqlite(tracking_uri)
    if not db.is_file():
        raise UIError(f"no MLflow store at {db}; run the sweep first")
    experiment_id = _experiment_id(uri, experiment)
    save_comparison_view(uri, experiment_id)
    chosen = free_port(DEFAULT_PORT if port is None else port)
    if port and chosen != port:
        raise UIError(f"port {port} on {HOST} is in use; pick another with --port")
    log_path = Path(tempfile.mkstemp(prefix="debias-mlflow-ui-", suffix=".log")[1])
    log = log_path.open("wb")
    artifacts = (db.parent / "mlartifacts").as_uri()  # where debias.tracking puts them too
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", artifacts, "--no-serve-artifacts",
           "--host", HOST, "--port", str(chosen), "--workers", "1"]
    # No GenAI job runner (a dozen huey consumers): viewing runs does not need it.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    # Its own group, so a Ctrl-C reaches only us; a watchdog kills the group if we are killed.
    from debias.watchdog import start_watchdog

    start_watchdog(os.getpid(), group=process.pid)
    handle = UIHandle(process=process, port=chosen, log_path=log_path, _log=log)
    try:
        _wait_ready(handle, timeout)
    except BaseException:
        stop_ui(handle)
        raise
    return comparison_url(handle.base_url, experiment_id), handle


def server_comparison_url(tracking_uri: str, experiment: str) -> str:
    """For an ``http(s)://`` tracking server: save the comparison view on ``experiment`` and
    return its URL (credentials in the URI masked)."""
    from debias.environment import redact_uri

    experiment_id = _experiment_id(tracking_uri, experiment)
    save_comparison_view(tracking_uri, experiment_id)
    return comparison_url(redact_uri(tracking_uri), experiment_id)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused id owned by someone else
        return False
    return True


def stop_ui(handle: UIHandle, timeout: float = 10.0, keep_log: bool = False) -> None:
    """Stop the server and every process of its group (workers included): SIGTERM, then
    SIGKILL for whatever is left after ``timeout`` seconds; then delete its log unless
    ``keep_log``. Safe to call twice."""
    pgid = handle.process.pid  # start_new_session: the server leads its own group
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            handle.process.poll()  # reap the leader so the group can empty
            if not _group_alive(pgid):
                break
            time.sleep(0.1)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        handle.process.wait(timeout=5)
    if handle._log is not None:
        handle._log.close()
        handle._log = None
    if not keep_log:
        handle.log_path.unlink(missing_ok=True)


def run_ui(tracking_uri: str, experiment: str, port: int | None = None) -> int:
    """The ``--ui`` command: start, print the URL, wait for Ctrl-C (or SIGTERM), stop."""
    from debias.environment import redact_uri

    if tracking_uri.startswith(("http://", "https://")):
        try:
            url = server_comparison_url(tracking_uri, experiment)
        except Exception as exc:  # the server does not answer, or no such experiment
            print(f"error: {redact_uri(str(exc))}", file=sys.stderr)
            return 1
        print(f"MLflow UI of sweep {experiment!r} (a tracking server already serves it; "
              f"nothing started):\n  {url}")
        return 0
    try:
        url, handle = start_ui(tracking_uri, experiment, port)
    except UIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with stop_signals_as_interrupt():
        try:
            print(f"MLflow UI of sweep {experiment!r} ({redact_uri(tracking_uri)}):\n  {url}\n"
                  "Ctrl-C stops it.", flush=True)
            while handle.process.poll() is None:
                time.sleep(0.5)
            print(f"error: mlflow server exited with code {handle.process.returncode}; the end "
                  f"of its log:\n{_tail(handle.log_path)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping the MLflow UI", flush=True)
            return 0
        finally:
            stop_ui(handle)


@contextlib.contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) both raise KeyboardInterrupt while a foreground
    server runs, so either reaches the cleanup that stops it. SIGINT is set explicitly: a
    process started in the background by a non-interactive shell (nohup, `cmd &` in a script)
    inherits SIGINT *ignored*, and Python then never raises KeyboardInterrupt for it. The
    previous handlers come back afterwards."""
    def interrupt(signum: int, frame: object) -> None:
        del signum, frame
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():  # None: set outside Python; default then
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
