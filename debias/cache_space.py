"""The decoded images' disk: how much a sweep's ``cache.decoded`` needs (the plan states it)
and whether the disk that would hold it can (refused before any trial where it cannot: the
storage's disk for ``shared``, every node's own disk for ``local``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from debias.data import DatasetError, GroupedDataset
from debias.data.decoded import decoded_bytes, decoded_path, stored_size
from debias.preflight import PreflightFailed
from debias.spec import Spec

__all__ = ["CacheSpaceError", "alive_nodes", "check_decoded_space", "decoded_cache_lines"]


class CacheSpaceError(PreflightFailed):
    """The decoded images do not fit where ``cache.decoded`` puts them."""


def _decoded_needs(spec: Spec) -> tuple[GroupedDataset, int] | None:
    """The dataset whose images the sweep decodes, and the bytes of its decoded array;
    None where nothing is decoded (in-memory data, ``cache.decoded: off``)."""
    if spec.cache.decoded == "off":
        return None
    data = spec.load_data(spec.targets[0])
    if data.image_paths is None:
        return None
    return data, decoded_bytes(len(data), data.image_size)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _cache_dir(spec: Spec) -> Path:
    return spec.cache.decoded_dir(spec.storage / "cache") or spec.storage / "cache"


def decoded_cache_lines(spec: Spec) -> list[str]:
    """The plan's line on decoded images: how much, and where (nothing if the data cannot
    be read yet: the checks before any trial say why)."""
    try:
        needs = _decoded_needs(spec)
    except DatasetError:
        return []
    if needs is None:
        return []
    data, size = needs
    placement = spec.cache.decoded
    where = ("on each node's disk" if placement == "local" else "in the sweep's storage")
    s = stored_size(data.image_size)
    return [f"  decoded images (cache.decoded: {placement}): {len(data):,} images x {s} x {s} "
            f"x 3 = {_gib(size)} {where}, under {_cache_dir(spec) / 'decoded'}; the page "
            "cache serves epochs from memory where a node's RAM holds it"]


def _free(folder: Path, array: Path) -> tuple[int, bool]:
    """(free bytes on the disk that would hold ``folder``, whether ``array`` is there)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free, array.is_file()


def _space_problem(where: str, folder: Path, free: int, need: int) -> str:
    return (f"cache.decoded: the decoded images need {_gib(need)} under {folder} but the disk "
            f"{where}has {_gib(free)} free; set cache.local_dir to a larger disk, use "
            "cache.decoded: shared (the sweep's storage) or off (decode every epoch), or "
            "lower dataset.image_size")


def alive_nodes() -> list[str]:
    """The node ids of the running Ray's alive nodes."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def check_decoded_space(spec: Spec, nodes: Iterable[str] | None = None) -> None:
    """Refuse, before any trial, a decoded cache its disk cannot hold: ``shared`` checks the
    storage's disk; ``local`` checks every alive node of the running Ray (``nodes``: the
    node ids; None: this machine only). Raises :class:`CacheSpaceError`."""
    try:
        needs = _decoded_needs(spec)
    except DatasetError:
        return  # the data checks say what is wrong with the data
    if needs is None:
        return
    data, need = needs
    folder = _cache_dir(spec)
    if spec.cache.decoded == "shared" or nodes is None:
        free, present = _free(folder, decoded_path(data, folder))
        if not present and free < need:
            raise CacheSpaceError(_space_problem("", folder, free, need))
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_free)
    answers = {node: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=False)).remote(folder, decoded_path(data, folder)) for node in nodes}
    ips = {n["NodeID"]: n.get("NodeManagerAddress", n["NodeID"]) for n in ray.nodes()}
    for node, ref in answers.items():
        free, present = ray.get(ref, timeout=60)
        if not present and free < need:
            raise CacheSpaceError(_space_problem(f"of node {ips.get(node, node)} ", folder,
                                                 free, need))
