#!/usr/bin/env python
"""Entry point: `python launch.py sweeps/quickstart.yaml` (see --help)."""

import sys

from debias.cli import main

if __name__ == "__main__":
    sys.exit(main())
