#!/usr/bin/env python
"""Entry point: `python launch.py sweeps/quickstart.yaml` (see --help)."""

from debias.cli import exit_now, main

if __name__ == "__main__":
    exit_now(main())
