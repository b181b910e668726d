"""A watchdog that cleans up after a process killed too hard to clean up itself.

A driver that starts a local Ray, or ``--ui`` that starts ``mlflow server``, stops them when
it exits, on Ctrl-C and on SIGTERM. SIGKILL leaves no chance: Ray's GCS, raylet, dashboard
and runtime-env agents, or the MLflow server and its workers, would go on listening. So the
parent starts this watchdog, a separate process in its own session (a signal to the parent's
process group does not reach it), which waits for the parent to disappear and then kills
what it was told to: every process whose *environment* holds a marker the parent set before
starting them (children inherit it; Ray renames its agents' command lines, so those cannot be
matched), and/or a process group (the MLflow server's).

Run as ``python -m debias.watchdog --parent PID [--match MARKER] [--group PGID]
[--session RAY_SESSION_DIR]`` (processes holding files open in that folder are Ray's too;
without it, the session folders the marked processes log to are found from their open
files). A driver arms it *before* ``ray.init``: a driver killed while Ray is starting leaves
nothing behind either.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence

__all__ = ["MARKER_VAR", "mark_environment", "matching_pids", "start_watchdog"]


#: The environment variable that marks a driver's processes for its watchdog.
MARKER_VAR = "DEBIAS_WATCHDOG"


_MARKER: str | None = None


def mark_environment() -> str:
    """Set (once per process) and return a marker only this process's children inherit. A
    marker inherited from a parent driver is replaced, never shared: each watchdog kills
    its own driver's processes, never a parent's."""
    global _MARKER
    if _MARKER is None:
        _MARKER = uuid.uuid4().hex
        os.environ[MARKER_VAR] = _MARKER
    return _MARKER


def matching_pids(marker: str, exclude: Sequence[int] = ()) -> list[int]:
    """Processes whose environment holds ``DEBIAS_WATCHDOG=marker`` (Linux /proc), but for
    ``exclude``."""
    needle = f"{MARKER_VAR}={marker}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            out.append(int(entry))
    return out


def holding_files_under(folder: str, exclude: Sequence[int] = ()) -> list[int]:
    """Processes with a file open under ``folder`` (Linux /proc). Ray's dashboard and
    runtime-env agents are started without the parent's environment on some Ray versions,
    but every one of them keeps its log files open in the Ray session's folder."""
    prefix = os.path.realpath(folder).rstrip("/") + "/"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(prefix):
                    out.append(int(entry))
                    break
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        return True
    # A zombie (killed, not yet reaped by its parent) is gone for our purposes.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
        if fh.read().rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


def start_watchdog(parent: int, match: str | None = None, group: int | None = None,
                   session: str | None = None) -> subprocess.Popen[bytes]:
    """Start a watchdog for ``parent``; it exits on its own once the parent is gone."""
    cmd = [sys.executable, "-m", "debias.watchdog", "--parent", str(parent)]
    env = {k: v for k, v in os.environ.items() if k != MARKER_VAR}  # never kill itself
    if match:
        cmd += ["--match", match]
    if group:
        cmd += ["--group", str(group)]
    if session:
        cmd += ["--session", session]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True, env=env)


def sessions_of(pids: Sequence[int]) -> set[str]:
    """The Ray session folders (``.../session_<date>_<pid>``) that processes ``pids`` hold
    files open in: a driver killed while ``ray.init`` was still starting never learnt its
    session, but its raylet and GCS (which carry the marker) already log there."""
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                match = re.search(r"^(/.*?/session_\d{4}-[^/]+)(/|$)", target)
                if match and not match.group(1).endswith("session_latest"):
                    out.add(match.group(1))
    return out


def _clean(match: str | None, group: int | None, session: str | None = None,
           passes: int = 3) -> None:
    """Kill what the parent left. A few passes: a raylet killed in the first can have been
    starting a worker, which the next one catches."""
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    sessions = {session} if session else set()
    for n in range(passes):
        pids = set(matching_pids(match, exclude=(os.getpid(), 1))) if match else set()
        sessions |= sessions_of(sorted(pids))
        for folder in sessions:
            pids |= set(holding_files_under(folder, exclude=(os.getpid(), 1)))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if n + 1 < passes:
            time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m debias.watchdog")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--match", default=None)
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--session", default=None, help="a Ray session folder")
    p.add_argument("--poll", type=float, default=0.5)
    args = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the parent's death ends it
    while _alive(args.parent):
        time.sleep(args.poll)
    # The parent's own clean-up (Ray's shutdown at exit) had its chance; kill the rest.
    _clean(args.match, args.group, args.session)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
