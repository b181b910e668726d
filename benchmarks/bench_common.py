"""What every benchmark script shares: how it was invoked, on what machine, and where its
Markdown section goes (stdout, and appended to --out)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch


def machine(extra: str = "") -> str:
    """Platform, CPUs, Python and torch versions, plus whatever the script adds."""
    text = (f"{platform.platform()}, {os.cpu_count()} CPUs ({platform.machine()}), "
            f"python {platform.python_version()}, torch {torch.__version__}")
    return f"{text}, {extra}" if extra else text


def command(script: str) -> str:
    """How this run was invoked, without --out (where the section went is not how to rerun)."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg == "--out" or arg.startswith("--out="):
            skip = arg == "--out"
            continue
        argv.append(arg)
    return shlex.join(["python", script, *argv])


def stamp() -> str:
    return datetime.now().isoformat(timespec="minutes")


def timed_trial(config: dict[str, Any]) -> tuple[float, float]:
    """(wall time of one in-process trial, of which building it: where the shared stages are
    computed or loaded)."""
    from debias.trainable import build_trial

    start = time.perf_counter()
    trial = build_trial(config, device="cpu")
    prep = time.perf_counter() - start
    for _ in trial.epochs():
        pass
    return time.perf_counter() - start, prep


def publish(text: str, out: Path | None) -> None:
    """Print the section and append it to `out` (BENCHMARKS.md) when given."""
    print(text)
    if out:
        with out.open("a") as f:
            f.write(text + "\n")
