"""Tune's saved state, kept restorable through a full disk, and the full disk itself.

Tune saves a sweep's state (``experiment_state-*.json``, the searcher's and the callbacks'
pickles, ``tuner.pkl``) in its local staging folder and copies it into ``storage`` every few
seconds; on a full disk the copy is cut short (a JSON file ending mid-way, an empty pickle),
and no later ``Tuner.restore`` can read it: every ``--resume`` failed. So:

- :class:`StateKeeper` copies the set of state files, once every one of them reads back
  whole, into one of two slots beside them (``tune.good/a``, ``tune.good/b``), the slot in
  use named by ``tune.good/current`` (replaced atomically once its slot is complete): a copy
  cut short by a full disk never replaces the last good one.
- :func:`recover` (before ``Tuner.restore``) puts that copy back where a state file does not
  read, and removes a trial's empty or unreadable ``error.pkl`` (which Tune would unpickle
  into ``EOFError: Ran out of input``).
- :class:`DiskWatch` stops the sweep at the first sign of a full disk under ``storage`` (a
  trial failing with ``No space left on device``, or less free space than a checkpoint
  needs), as Ctrl-C does, so no trial is retried into the wall; :func:`disk_full_message`
  then names the folder and the space to free.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from ray import tune

from debias.files import atomic_write_text

__all__ = ["DiskWatch", "StateKeeper", "disk_full_message", "recover"]

log = logging.getLogger("debias")

GOOD = "tune.good"
PATTERNS = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
            "callback-states-*.pkl", "tuner.pkl")
#: Below this many bytes free under storage, the disk counts as full.
MIN_FREE = 2 * 2**20


def _state_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in PATTERNS for p in folder.glob(pattern) if p.is_file())


def _reads(path: Path) -> bool:
    """Whether a state file reads back whole."""
    try:
        data = path.read_bytes()
        if not data:
            return False
        if path.name.startswith("experiment_state-"):  # (search_gen_state-*.json: a pickle)
            json.loads(data)
        else:  # read the opcodes to the end, building nothing (no object runs any code)
            import pickletools

            for _ in pickletools.genops(data):
                pass
    except Exception:  # cut short, or not what it should be
        return False
    return True


def _current(good: Path) -> Path | None:
    with contextlib.suppress(OSError):
        name = (good / "current").read_text().strip()
        if name in ("a", "b") and (good / name).is_dir():
            return good / name
    return None


class StateKeeper:
    """Keeps the last good copy of Tune's state files of ``tune_dir`` while a sweep runs
    (a thread checking every ``every_s``; :meth:`keep` once more at the end)."""

    def __init__(self, tune_dir: Path, every_s: float = 1.0) -> None:
        self.tune_dir = Path(tune_dir)
        self.good = self.tune_dir.parent / GOOD
        self.every_s = every_s
        self._seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-state-keeper",
                                        daemon=True)

    def __enter__(self) -> StateKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.keep()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.keep()

    def keep(self) -> bool:
        """Copy the state files if they changed and every one reads whole; True if a new
        good copy is in place."""
        try:
            files = _state_files(self.tune_dir)
            if not files or not any(f.name.startswith("experiment_state-") for f in files):
                return False
            seen = {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in files}
            if seen == self._seen or not all(_reads(f) for f in files):
                return False
            self.good.mkdir(exist_ok=True)
            current = _current(self.good)
            slot = self.good / ("b" if current is not None and current.name == "a" else "a")
            shutil.rmtree(slot, ignore_errors=True)
            slot.mkdir()
            for f in files:
                shutil.copy2(f, slot / f.name)
                with open(slot / f.name, "rb") as handle:
                    os.fsync(handle.fileno())
            if not all(_reads(slot / f.name) for f in files):
                return False
            atomic_write_text(self.good / "current", slot.name + "\n")
            self._seen = seen
            return True
        except OSError as exc:  # a full disk: the last good copy stays as it is
            log.debug("could not keep a copy of Tune's state: %s", exc)
            return False


def recover(tune_dir: Path) -> list[str]:
    """Make ``tune_dir`` restorable: state files that do not read are replaced by the last
    good copy, trials' unreadable ``error.pkl`` removed. Returns what was done (for a
    warning); raises RuntimeError when a state file is damaged and no good copy exists."""
    tune_dir = Path(tune_dir)
    done: list[str] = []
    for error_pkl in tune_dir.glob("*/error.pkl"):
        if _reads(error_pkl):
            continue
        with contextlib.suppress(OSError):
            error_pkl.unlink()
            done.append(f"removed {error_pkl} (empty or cut short)")
    files = _state_files(tune_dir)
    bad = [f for f in files if not _reads(f)]
    if not bad:
        return done
    good = _current(tune_dir.parent / GOOD)
    if good is None:
        raise RuntimeError(
            f"Tune's saved state in {tune_dir} does not read ({', '.join(f.name for f in bad)} "
            "cut short, by a full disk?) and no good copy of it was kept, so the sweep cannot "
            "be resumed; start it afresh under another name (--set name=NEW_NAME)")
    for f in files:
        f.unlink()
    for f in sorted(good.iterdir()):
        shutil.copy2(f, tune_dir / f.name)
    when = time.strftime("%H:%M:%S", time.localtime(max(f.stat().st_mtime
                                                        for f in good.iterdir())))
    done.append(f"Tune's state files {', '.join(f.name for f in bad)} did not read (cut short "
                f"by a full disk?); put back the last good copy, saved at {when}")
    return done


# --------------------------------------------------------------------------- full disks


def _is_enospc(text: str) -> bool:
    return "No space left on device" in text or f"[Errno {errno.ENOSPC}]" in text


def free_bytes(folder: Path) -> int | None:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


class DiskWatch(tune.Callback):
    """Stops the sweep (as Ctrl-C does: Tune saves what it can, every trial resumes later)
    when a trial fails on a full disk under ``storage``, and remembers it for the driver's
    message. Holds only the folder, so Tune can pickle it with the experiment."""

    #: Sweep storage folder -> what was seen, set once the disk was found full.
    full: ClassVar[dict[str, str]] = {}

    def __init__(self, storage: str) -> None:
        self.storage = str(storage)

    def _check(self, trial: Any, text: str = "") -> None:
        if self.storage in DiskWatch.full:
            return
        free = free_bytes(Path(self.storage))
        if not _is_enospc(text) and (free is None or free >= MIN_FREE):
            return
        DiskWatch.full[self.storage] = (f"trial {trial.trial_id}: "
                                        f"{text.strip().splitlines()[-1][:200] if text else ''}")
        log.error("the disk holding %s is full (%s bytes free): stopping the sweep so that it "
                  "can be resumed once there is space", self.storage, free)
        os.kill(os.getpid(), signal.SIGINT)

    def _error_text(self, trial: Any) -> str:
        with contextlib.suppress(Exception):
            if trial.error_file and Path(trial.error_file).is_file():
                return Path(trial.error_file).read_text(errors="replace")
        return ""

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial, self._error_text(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial, self._error_text(trial))

    @staticmethod
    def note(storage: str | Path, what: str) -> None:
        """The driver itself met a full disk (e.g. copying a model): stop the same way."""
        if str(storage) not in DiskWatch.full:
            DiskWatch.full[str(storage)] = what
            log.error("the disk holding %s is full: stopping the sweep", storage)
            os.kill(os.getpid(), signal.SIGINT)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_full_message(storage: Path, tune_dir: Path, trials_left: int, command: str) -> str:
    """What a person reads after a sweep stopped on a full disk: the folder, the space free,
    the space the rest of the sweep needs (two checkpoints per trial still to run, as Tune
    keeps, and its selected model), and the command that continues it."""
    checkpoints = [d for d in Path(tune_dir).glob("*/checkpoint_*") if d.is_dir()]
    largest = max((_size(d) for d in checkpoints), default=0)
    need = max(3 * largest * max(trials_left, 1) + 4 * MIN_FREE, 16 * 2**20)
    free = free_bytes(storage) or 0
    return (f"the disk holding storage {storage} is full ({free / 2**20:.1f} MB free). The "
            f"sweep was stopped and nothing is lost: free at least {need / 2**20:.0f} MB "
            f"there ({max(trials_left, 1)} trial(s) still to run, each keeping two "
            f"checkpoints and its selected model of up to {largest / 2**20:.1f} MB), then "
            f"continue with: {command}")
