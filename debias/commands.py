"""The commands the sweep prints for a person to run next, built by one function.

A hint that drops an override runs another sweep: ``--sync`` printed without the
``--set name=...`` a sweep was started with syncs a different journal ("0 of 0 uploaded")
and exits 0. So every printed command (``--resume``, ``--sync``, ``--annotate``, ``--ui``,
``--report``) is :func:`launch_command` of the sweep file and *every* ``--set`` it was
given, in order, shell-quoted, with credentials masked (a masked ``tracking.uri`` given back
is completed from ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``; see
:func:`debias.redaction.unmask_uri`).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from debias.redaction import redact

__all__ = ["launch_command", "sweep_command"]


def interpreter() -> str:
    """The Python that runs this command, as a person would type it here: relative to the
    current folder when it lives below it (``.venv/bin/python``: a plain ``python`` may be
    another one, without the project's packages), else ``python``."""
    exe = Path(sys.executable)
    try:
        rel = exe.relative_to(Path.cwd())
    except ValueError:
        return "python"
    return str(rel) if os.sep in str(rel) else f".{os.sep}{rel}"


def launch_command(source: str, overrides: Sequence[str] = (), *flags: str) -> str:
    """``.venv/bin/python launch.py SOURCE --set K=V ... FLAGS`` (the interpreter that runs
    this, see :func:`interpreter`), each argument shell-quoted and redacted."""
    args = [str(source), *(a for item in overrides for a in ("--set", redact(item))),
            *flags]
    return f"{interpreter()} launch.py " + shlex.join(args)


def sweep_command(spec: Any, *flags: str) -> str:
    """:func:`launch_command` of a validated :class:`debias.spec.Spec`."""
    return launch_command(spec.source, spec.overrides, *flags)
