"""Scenario run in its own process by tests/test_multinode.py: a Ray cluster of a head with no
CPUs (so trials and stage tasks go to workers) and two 1-CPU worker nodes on this machine
(`ray.cluster_utils.Cluster`), sharing one storage path; a sweep runs on it.
Usage: python -m tests.scenarios.two_nodes SWEEP.yaml"""

from __future__ import annotations

import sys

from debias.spec import load_spec
from debias.sweep import run_sweep
from tests.scenarios import start_cluster, stop_cluster


def main() -> int:
    spec = load_spec(sys.argv[1])
    cluster, _ = start_cluster()
    try:
        run_sweep(spec, address=cluster.address)
    finally:
        stop_cluster(cluster)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
