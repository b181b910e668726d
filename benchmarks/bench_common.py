"""What every benchmark script shares: how it was invoked, on what machine, and where its
Markdown section goes (stdout, and appended to --out)."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime
from pathlib import Path

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


def publish(text: str, out: Path | None) -> None:
    """Print the section and append it to `out` (BENCHMARKS.md) when given."""
    print(text)
    if out:
        with out.open("a") as f:
            f.write(text + "\n")
