"""One sweep per (tracking store, name) at a time, whatever its storage.

Two sweeps with one ``name`` on one store share one MLflow experiment: started together
(different ``storage``), both passed the "already has results" check and wrote their trials
under the same parents. So before Ray starts, a sweep *claims* its experiment in the tracking
store itself, where every machine that can write there also reads:

- Each driver writes an experiment tag of its own, ``debias.claim.<token>`` (``token``:
  unique to the process), holding its sweep's id, host, pid, start time and a heartbeat:
  first as ``claiming``, then reads every claim back. Seeing another live claim it removes
  its own and waits a random moment (two starting together both see each other and back off;
  one of them comes first next time); seeing none it marks its claim ``held``. The store is
  linearisable (one database), and each writes before it reads, so of two claimants at least
  one sees the other: two can never both hold it.
- A ``held`` claim refuses every other sweep before Ray starts, naming it (id, host, pid,
  storage, since when). It is refreshed every ``HEARTBEAT_S`` by a thread while the sweep
  runs and removed when it ends. A claim is *stale*, and taken over, when its process is
  gone (same host: the pid no longer runs, or runs another program) or, from another host,
  when its heartbeat is older than ``DEBIAS_CLAIM_STALE_S`` (default 120 s).
- The experiment also records which sweep its runs belong to (``debias.sweep_id`` and the
  storage it ran from), so a later sweep of that name from another storage is refused
  instead of writing under the first one's parents; and the sweep's runs are keyed by that
  id (:class:`debias.sweep_log.SweepLog`), never matched by name alone.

The sweep id is made once per sweep and kept in ``<storage>/<name>/sweep_id`` (a resumed
sweep is the same sweep).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from debias.redaction import redact, redact_uri

__all__ = ["CLAIM_PREFIX", "SWEEP_STORAGE_TAG", "SWEEP_TAG", "Claim", "ClaimRefused", "adopt",
           "claim_experiment", "sweep_id"]

log = logging.getLogger("debias")

CLAIM_PREFIX = "debias.claim."
#: Experiment tags: the sweep whose runs the experiment holds, and where it ran from.
SWEEP_TAG = "debias.sweep_id"
SWEEP_STORAGE_TAG = "debias.sweep_storage"
ID_FILE = "sweep_id"
HEARTBEAT_S = 15.0
#: Two claimants that keep seeing each other give up after this long (never in practice:
#: each backs off for a random moment).
CONTEND_S = 60.0


class ClaimRefused(RuntimeError):
    """Another sweep holds the experiment, or its runs belong to another sweep."""


#: Seconds one refresh or release of a claim may take (a single attempt).
QUICK_S = 10.0


def _stale_after() -> float:
    return float(os.environ.get("DEBIAS_CLAIM_STALE_S", 120))


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if it does not run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def sweep_id(folder: Path, create: bool = True) -> str | None:
    """The sweep's id, kept in ``folder/sweep_id`` (made on first use when ``create``)."""
    from debias.files import atomic_write_text

    path = folder / ID_FILE
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if text:
            return text
    if not create:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    new = uuid.uuid4().hex[:16]
    atomic_write_text(path, new + "\n")
    return new


@dataclass
class _Entry:
    key: str
    data: dict[str, Any]

    def describe(self) -> str:
        d = self.data
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.get("started", 0)))
        return (f"sweep {d.get('sweep_id', '?')} (pid {d.get('pid', '?')} on "
                f"{d.get('host', '?')}, storage {d.get('storage', '?')}, running since {since})")


class Claim:
    """A held claim: refreshed by a thread until :meth:`release`.

    The refresh and the release go through :func:`debias.mlflow_adapter.connect` (one
    attempt per request, at most :data:`QUICK_S` seconds): a tracking server that is down
    when the sweep ends must not hold the driver in MLflow's own retries (minutes) for a tag
    that goes stale by itself (a dead process's claim is not live, see :func:`_live`)."""

    def __init__(self, client: Any, experiment_id: str, key: str, data: dict[str, Any],
                 uri: str) -> None:
        from debias.mlflow_adapter import connect

        self.client = client
        self.store = connect(uri, QUICK_S)
        self.experiment_id = experiment_id
        self.key = key
        self.data = data
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sweep-claim", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.data["heartbeat"] = time.time()
        self.store.set_experiment_tag(self.experiment_id, self.key, json.dumps(self.data))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                tag = self.store.experiment_tags(self.experiment_id).get(self.key)
                if not tag:
                    log.error("the claim of this sweep on its MLflow experiment was removed "
                              "(another process took it as stale?); another sweep of this "
                              "name may now start")
                self._write()
            except Exception as exc:  # the store is down: the next beat tries again
                log.debug("could not refresh the sweep's claim: %s", redact(exc))

    def release(self) -> None:
        """Stop refreshing and remove the claim (idempotent; a store that does not answer
        leaves it to go stale)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            self.store.delete_experiment_tag(self.experiment_id, self.key)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created by another sweep meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _live(entry: _Entry, now: float, me: dict[str, Any]) -> bool:
    d = entry.data
    if d.get("host") == me["host"] and d.get("boot") == me["boot"]:
        return _start_ticks(int(d.get("pid", 0) or 0)) == d.get("pid_start")
    return now - float(d.get("heartbeat", 0) or 0) < _stale_after()


def _claims(client: Any, experiment_id: str) -> tuple[dict[str, str], list[_Entry]]:
    tags = dict(client.get_experiment(experiment_id).tags)
    out = []
    for key, value in tags.items():
        if not key.startswith(CLAIM_PREFIX) or not value:
            continue
        try:
            data = json.loads(value)
        except ValueError:
            data = {}
        out.append(_Entry(key, data if isinstance(data, dict) else {}))
    return tags, out


def claim_experiment(uri: str, name: str, storage: Path) -> Claim:
    """Claim experiment ``name`` at ``uri`` (created if absent) for the sweep of
    ``storage``, or raise :class:`ClaimRefused` naming the sweep that holds it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, name, uri)
    me = {"sweep_id": sweep_id(Path(storage) / name, create=False) or "new",
          "host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
          "pid_start": _start_ticks(os.getpid()), "storage": str(storage),
          "started": time.time(), "state": "claiming"}
    key = f"{CLAIM_PREFIX}{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + CONTEND_S
    while True:
        now = time.time()
        _tags, entries = _claims(client, experiment_id)
        others = [e for e in entries if e.key != key]
        for e in others:
            if not _live(e, now, me):  # its process is gone: nobody holds it
                with contextlib.suppress(Exception):
                    client.delete_experiment_tag(experiment_id, e.key)
        live = [e for e in others if _live(e, now, me)]
        held = [e for e in live if e.data.get("state") == "held"]
        if held:
            with contextlib.suppress(Exception):
                client.delete_experiment_tag(experiment_id, key)
            raise ClaimRefused(
                f"sweep {name!r} is already running in the MLflow store {redact_uri(uri)}: "
                f"{held[0].describe()}. Two sweeps of one name on one store would mix their "
                "runs; wait for it to end (or stop it), then run this again, or give this run "
                "another name with --set name=NEW_NAME")
        if not live:
            me["heartbeat"] = time.time()
            client.set_experiment_tag(experiment_id, key, json.dumps(me))
            _tags, entries = _claims(client, experiment_id)
            rivals = [e for e in entries if e.key != key and _live(e, time.time(), me)]
            if not rivals:
                me["state"] = "held"
                claim = Claim(client, experiment_id, key, me, uri)
                claim._write()
                return claim
            with contextlib.suppress(Exception):
                client.delete_experiment_tag(experiment_id, key)
        if time.monotonic() > deadline:
            raise ClaimRefused(f"sweep {name!r}: other sweeps of this name keep starting in "
                               f"{redact_uri(uri)} at the same moment; run one at a time")
        time.sleep(random.uniform(0.2, 1.5))


def adopt(claim: Claim, uri: str, name: str, sweep: str, storage: Path, has_runs: Any) -> None:
    """Record that the experiment's runs are sweep ``sweep``'s (of ``storage``), unless they
    belong to another sweep: then :class:`ClaimRefused` says which and where it ran from.
    ``has_runs()``: whether the experiment holds parent runs (an owner with none left is
    replaced). Call once the sweep is known to be allowed to run (new, or resumed)."""
    client, experiment_id = claim.client, claim.experiment_id
    claim.data["sweep_id"] = sweep
    with contextlib.suppress(Exception):
        claim._write()
    tags = dict(client.get_experiment(experiment_id).tags)
    owner = tags.get(SWEEP_TAG)
    if owner and owner != sweep and has_runs():
        where = tags.get(SWEEP_STORAGE_TAG, "?")
        raise ClaimRefused(
            f"sweep {name!r} in the MLflow store {redact_uri(uri)} holds the runs of another "
            f"sweep of that name (id {owner}, storage {where}), not of this one (storage "
            f"{storage}): its runs and this sweep's would mix. Continue that sweep with "
            f"--set storage={where} --resume, or give this one another name with "
            "--set name=NEW_NAME")
    if owner != sweep:
        client.set_experiment_tag(experiment_id, SWEEP_TAG, sweep)
        client.set_experiment_tag(experiment_id, SWEEP_STORAGE_TAG, str(storage))
