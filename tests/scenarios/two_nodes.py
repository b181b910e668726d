"""Scenario run in its own process by tests/test_multinode.py: a Ray cluster of a head with no
CPUs (so trials and stage tasks go to workers) and two 1-CPU worker nodes on this machine
(`ray.cluster_utils.Cluster`), sharing one storage path; a sweep runs on it.
Usage: python -m tests.scenarios.two_nodes SWEEP.yaml"""

from __future__ import annotations

import sys

from ray.cluster_utils import Cluster

from debias.spec import load_spec
from debias.sweep import run_sweep


def main() -> int:
    spec = load_spec(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    print(f"SCENARIO: workers {[w.node_id for w in workers]}", flush=True)
    try:
        run_sweep(spec, address=cluster.address)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
