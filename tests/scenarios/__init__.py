"""Scenarios that tests run in a process of their own (`python -m tests.scenarios.NAME`)."""

from __future__ import annotations

from typing import Any


def start_cluster(workers: int = 2) -> tuple[Any, list[Any]]:
    """A Ray cluster on this machine: a head with no CPUs (so trials and stage tasks must go
    to the workers) and `workers` 1-CPU worker nodes; prints the worker node ids for the
    test to read."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(workers)]
    cluster.wait_for_nodes()
    print(f"SCENARIO: workers {[w.node_id for w in nodes]}", flush=True)
    return cluster, nodes


def stop_cluster(cluster: Any) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()
