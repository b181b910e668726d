"""Content-addressed stage cache: expensive work that many trials share is done once.

A stage (a reference model, a feature matrix, k-means pseudo-labels, GradCAM maps, a curated
subset) is keyed by a hash of exactly the inputs that determine it plus the stage's code
version, and stored under the sweep's `storage` so every trial on every node of a cluster
finds it. Values are dicts of tensors and plain Python, saved with `torch.save` and loaded
with `weights_only=True`, so a cache file can never execute code.

Concurrency (both through :mod:`debias.files`): a file is written to a temporary name in the
same folder and renamed into place (atomic on POSIX and NFS), so a reader sees either nothing
or a whole file. Trials on one node also take an advisory `flock` on the key while
computing, so the second waits and reuses the first's result; across nodes (where locks are
unreliable on shared file systems) two racing trials may both compute, and the later rename
simply replaces an identical file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from debias.files import atomic_torch_save, atomic_write_text, locked

__all__ = ["CorruptFile", "StageCache", "stage_key"]

log = logging.getLogger(__name__)


def stage_key(stage: str, version: int, inputs: Mapping[str, Any]) -> str:
    """Hash of a stage's name, code version and inputs (JSON, sorted keys)."""
    blob = json.dumps({"stage": stage, "version": version, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class StageCache:
    """Get-or-compute for shared stages. `computed` and `reused` count this process's events,
    so a trial can report how much work it did (and tests can check it did none)."""

    _events_lock = threading.Lock()
    computed: ClassVar[Counter[str]] = Counter()
    reused: ClassVar[Counter[str]] = Counter()

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        #: {stage: [keys]} this cache object served, in order: a trial tags its MLflow run
        #: with them (``stage/<name>``), so anyone can see which runs shared what.
        self.used: dict[str, list[str]] = {}

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.pt"

    def get_or_compute(self, stage: str, version: int, inputs: Mapping[str, Any],
                       compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Return the stored value for these inputs, computing and storing it if absent."""
        key = stage_key(stage, version, inputs)
        keys = self.used.setdefault(stage, [])
        if key not in keys:
            keys.append(key)
        path = self.path(stage, key)
        if (value := self._load(path)) is not None:
            self._count(self.reused, stage)
            return value
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_suffix(".lock")):
            if (value := self._load(path)) is not None:  # another trial finished it meanwhile
                self._count(self.reused, stage)
                return value
            log.info("computing stage %s (%s)", stage, key)
            value = compute()
            self._store(path, value, inputs)
            self._count(self.computed, stage)
            return value

    def stage_tags(self) -> dict[str, str]:
        """``{"stage/<name>": "key[,key...]"}`` of every stage this cache object served."""
        return {f"stage/{stage}": ",".join(keys) for stage, keys in self.used.items()}

    @classmethod
    def _count(cls, counter: Counter[str], stage: str) -> None:
        with cls._events_lock:
            counter[stage] += 1

    @classmethod
    def events(cls) -> dict[str, int]:
        """`cache/computed/<stage>` and `cache/reused/<stage>` counts, as flat metrics."""
        with cls._events_lock:
            out = {f"cache/computed/{k}": v for k, v in cls.computed.items()}
            out.update({f"cache/reused/{k}": v for k, v in cls.reused.items()})
        return out

    @classmethod
    def reset_events(cls) -> None:
        with cls._events_lock:
            cls.computed.clear()
            cls.reused.clear()

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        """The stored value, or None (recompute) for a file that does not load, or loads but
        is not what was stored (its keys differ from the record beside it)."""
        if not path.is_file():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a file from an older torch, or damaged on disk: recompute
            log.warning("ignoring unreadable cache file %s (%s)", path, exc)
            return None
        expected = _stored_keys(path.with_suffix(".json"))
        if not isinstance(value, dict) or (expected is not None
                                           and sorted(map(str, value)) != expected):
            log.warning("ignoring cache file %s: it does not hold what was stored there "
                        "(keys %s, expected %s); recomputing", path,
                        sorted(map(str, value)) if isinstance(value, dict) else type(value),
                        expected)
            return None
        return value

    @staticmethod
    def _store(path: Path, value: dict[str, Any], inputs: Mapping[str, Any]) -> None:
        atomic_torch_save(path, value)
        # A human-readable record of what the key stands for, for whoever inspects the cache,
        # and of the keys the value holds, so a file swapped or damaged later is recomputed.
        atomic_write_text(path.with_suffix(".json"), json.dumps(
            {"inputs": inputs, "keys": sorted(map(str, value))}, sort_keys=True, indent=1,
            default=str))


class CorruptFile(RuntimeError):
    """A file that must load (a checkpoint, a weights file) does not: retrying cannot help."""


def _stored_keys(meta: Path) -> list[str] | None:
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    keys = record.get("keys") if isinstance(record, dict) else None
    return keys if isinstance(keys, list) else None
