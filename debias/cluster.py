"""Where a sweep runs: connecting to (or starting) Ray, and what its nodes can hold.

Kept apart from the sweep's bookkeeping so that the rules about resources are one place: a
trial asks for ``{cpu, gpu}``; a node of ``{CPU: C, GPU: G}`` runs
``min(C // cpu, G // gpu)`` of them at once. A fractional GPU packs trials only when the CPU
request leaves room: ``{cpu: 4, gpu: 0.5}`` on a ``{CPU: 4, GPU: 1}`` node runs *one* trial
and idles half the GPU; :func:`packing_warnings` says so, with the numbers, for live nodes
and for the autoscaler's node types.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

import ray

__all__ = ["ClusterError", "check_resources", "init_ray", "limit_threads", "node_types",
           "packing_warnings", "trials_per_node"]

log = logging.getLogger("debias")


class ClusterError(RuntimeError):
    """Ray cannot be reached or cannot hold a trial; the message says what to do."""


def limit_threads(cpus: float) -> int:
    """Give torch as many threads as the CPUs a trial (or a stage task) holds (at least
    one), so work packed on one machine does not oversubscribe its cores."""
    import torch

    n = max(1, int(cpus))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """`host:port` and `ray://host:port` must accept a TCP connection now: ray.init would
    otherwise keep retrying an address nobody listens on for minutes."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)", address.strip())
    if not match:
        return  # "auto", "local" and the like: Ray resolves and reports these itself
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r} "
                           f"({exc.strerror or exc}). Start one with `ray up cluster.yaml` (or "
                           "`ray start --head`), or drop --address to run on a local Ray."
                           ) from None


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`, or RAY_ADDRESS) or start a local Ray, watched so that
    none of its processes outlive a driver killed with SIGKILL."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Tune's classic output engine, which takes the sweep's own progress view.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Save Tune's experiment state often: a killed driver then loses at most seconds of it;
    # the warning Tune prints when it snapshots more often than that says nothing to a user.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    # A line that tells a user nothing they can act on: Ray's token authentication (kept on).
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {exc}. Start "
                               "one with `ray up cluster.yaml` or drop --address to run "
                               "locally.") from None
    else:
        # Every process this local Ray starts inherits the marker; if the driver is killed
        # with SIGKILL, the watchdog kills them (Ray's agents outlive a killed driver).
        from debias.watchdog import mark_environment, start_watchdog

        # Armed before ray.init: a driver killed while Ray starts leaves nothing behind (the
        # watchdog finds the session folder from the marked processes' open files).
        marker = mark_environment()
        start_watchdog(os.getpid(), match=marker)
        ray.init(num_cpus=num_cpus, **kwargs)


def _need(resources: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in (("CPU", resources["cpu"]), ("GPU", resources["gpu"])) if v > 0}


def trials_per_node(resources: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many trials of ``resources`` one node of ``node`` resources runs at once."""
    need = _need(resources)
    if not need:
        return 0
    return min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in need.items())


def node_types() -> list[tuple[str, dict[str, float], bool]]:
    """(name, resources, autoscaling) of the live nodes and the autoscaler's node types."""
    out = [(f"node {n.get('NodeManagerAddress', '?')}", dict(n["Resources"]), False)
           for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older or newer Ray without this accessor: live nodes only
        config = None
    if config is not None:
        out += [(f"node type {getattr(g, 'name', '?')}", dict(g.resources), True)
                for g in config.node_group_configs if g.max_count != 0]
    return out


def check_resources(resources: Mapping[str, float]) -> None:
    """Fail now, not pending forever, when no node can ever hold one trial: neither a node
    that is up nor a node type the cluster's autoscaler may start."""
    nodes = node_types()
    if any(trials_per_node(resources, r) >= 1 for _, r, _ in nodes):
        return
    alive = [r for _, r, scaling in nodes if not scaling]
    largest = ", ".join(f"{{CPU: {r.get('CPU', 0):g}, GPU: {r.get('GPU', 0):g}}}"
                        for r in alive) or "none"
    raise ClusterError(
        f"resources: every trial asks for {{cpu: {resources['cpu']:g}, gpu: "
        f"{resources['gpu']:g}}}, but no node of this Ray cluster can ever provide that "
        f"(nodes: {largest}; no autoscaling node type fits either). Lower resources.cpu / "
        "resources.gpu, or run on a cluster with such nodes (see cluster.yaml).")


def packing_warnings(resources: Mapping[str, float],
                     nodes: list[tuple[str, dict[str, float], bool]]) -> list[str]:
    """Where the CPU request, not the GPU fraction, limits the trials per GPU node: the
    fraction promised ``1 / gpu`` trials per GPU, the CPUs allow fewer."""
    gpu, cpu = float(resources["gpu"]), float(resources["cpu"])
    if not 0 < gpu < 1:
        return []
    out = []
    for name, have, _ in nodes:
        if have.get("GPU", 0) <= 0:
            continue
        by_gpu = math.floor(have["GPU"] / gpu + 1e-9)
        by_cpu = math.floor(have.get("CPU", 0) / cpu + 1e-9) if cpu else by_gpu
        if by_cpu < by_gpu:
            fit = have.get("CPU", 0) / by_gpu
            out.append(
                f"resources: {{cpu: {cpu:g}, gpu: {gpu:g}}} on {name} {{CPU: "
                f"{have.get('CPU', 0):g}, GPU: {have['GPU']:g}}} runs {by_cpu} trial(s) at "
                f"once, not the {by_gpu} the GPU fraction allows: the CPU request binds first "
                f"and {(by_gpu - by_cpu) * gpu:g} GPU idles. Ask for cpu <= {fit:g} to pack "
                f"{by_gpu}.")
    return out
