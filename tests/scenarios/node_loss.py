"""Scenario run in its own process by tests/test_multinode.py: a Ray cluster of one head
(no CPUs, so trials must go to workers) and two worker nodes, all on this machine
(`ray.cluster_utils.Cluster`); a sweep runs on it and one worker node is removed as soon as
both running trials have checkpointed. Usage: python -m tests.scenarios.node_loss SWEEP.yaml
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from ray.cluster_utils import Cluster

from debias.spec import load_spec
from debias.sweep import run_sweep
from tests.scenarios import start_cluster, stop_cluster


def kill_worker_after_checkpoints(cluster: Cluster, worker, storage: Path,
                                       done: threading.Event) -> None:
    while not done.is_set():
        # Both workers' trials have reported (so each node shows in MLflow) and checkpointed.
        if len({c.parent for c in storage.rglob("checkpoint_*")}) >= 2:
            cluster.remove_node(worker, allow_graceful=False)
            print(f"SCENARIO: removed worker node {worker.node_id}", flush=True)
            return
        time.sleep(0.05)


def main() -> int:
    spec = load_spec(sys.argv[1])
    cluster, workers = start_cluster()
    done = threading.Event()
    killer = threading.Thread(target=kill_worker_after_checkpoints,
                              args=(cluster, workers[1], spec.storage, done), daemon=True)
    killer.start()
    try:
        run_sweep(spec, address=cluster.address)
    finally:
        done.set()
        stop_cluster(cluster)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
