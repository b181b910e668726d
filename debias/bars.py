"""Progress bars of long steps (the reference model's epochs, GradCAM, feature extraction,
decoding a dataset): shown where a person watches a terminal, silent elsewhere.

Inside Ray workers stderr is a pipe that Ray copies to the driver line by line, so every
redraw of a bar becomes a log line ("[repeated 19x across cluster]"): the sweep's compact
view already says what runs. ``--verbose`` (DEBIAS_VERBOSE, inherited by a local Ray's
workers) brings them back.
"""

from __future__ import annotations

import os
import sys

__all__ = ["bars_disabled"]


def bars_disabled() -> bool:
    """``disable=`` for tqdm: True unless stderr is a terminal or --verbose asked for them."""
    if os.environ.get("DEBIAS_VERBOSE"):
        return False
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
