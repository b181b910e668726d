"""Writing files so that no reader ever sees half of one, and one writer at a time.

Every file the package writes for someone else to read (stage cache entries, the decoded-image
array, the annotation CSV, a folder of overlays) goes through this module, so there is one way
of doing it:

- :func:`atomic_output` (and :func:`atomic_write_bytes`, :func:`atomic_write_text`,
  :func:`atomic_torch_save` on top of it): the content goes to a temporary file in the
  target's folder (``.<name>.<pid>.<random>.tmp``, a name no reader opens), is flushed to
  disk (``fsync``) and renamed over the target with :func:`os.replace`, which is atomic on
  local POSIX file systems and on NFS: a reader sees the old file or the new one, never a
  mix. If anything fails the temporary file is removed and the target is left untouched. A
  replaced file keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.
- :func:`atomic_dir` / :func:`atomic_replace_dir`: a folder is built in a staging folder
  beside its target and renamed into place when whole. Where the target already exists
  (another process finished first) the staging folder is discarded and the target kept:
  callers use this for content that any writer computes identically.
- :func:`locked`: an exclusive advisory ``flock`` on a lock file, held for a block. It
  serialises writers on one machine (across processes, and across threads that open the
  lock separately); across the machines of a cluster, ``flock`` on a shared file system is
  unreliable, so callers must stay correct without it (the atomic rename keeps readers safe;
  the work may be done twice). Where the file system refuses locks altogether (some NFS
  mounts, read-only folders) the block runs **unlocked** and :attr:`FileLock.held` says so.
  With ``blocking=False`` a lock held by someone else raises :class:`LockHeld`, carrying the
  note its holder wrote into the lock file (:meth:`FileLock.note`), e.g. a URL to go to.

Lock files are left in place when released: deleting one would let two writers lock two
different files of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["FileLock", "LockHeld", "acquire", "append_line", "atomic_dir", "atomic_output",
           "atomic_replace_dir", "atomic_torch_save", "atomic_write_bytes", "atomic_write_text",
           "locked"]


def _temp_beside(path: Path) -> Path:
    """A new, empty, exclusively created file in ``path``'s folder, named so no reader takes
    it for ``path``. Created with mode 0o666 so the umask applies, as for a plain ``open``."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")  # pragma: no cover


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to (by any means: ``open``,
    ``torch.save``, ``np.lib.format.open_memmap``); when the block ends without an error the
    file is synced and renamed over ``path``. On an error it is removed and ``path`` is
    untouched. The parent folder must exist."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        yield tmp
        _fsync(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, path.stat().st_mode & 0o7777)  # a replaced file keeps its mode
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_output`)."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically; written as given (no newline translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_output`)."""
    import torch  # here, so this module stays a light leaf for code that never saves tensors

    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return path


def atomic_replace_dir(staging: str | Path, target: str | Path) -> bool:
    """Rename the finished folder ``staging`` to ``target``. True if it was put in place;
    False if ``target`` already existed (another writer was first): ``staging`` is then
    removed and ``target`` left as it is. ``staging`` must be on ``target``'s file system
    (make it with :func:`atomic_dir`, or beside ``target``). Any other failure raises."""
    staging, target = Path(staging), Path(target)
    try:
        os.replace(staging, target)  # fails on an existing non-empty target folder
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields an empty staging folder beside ``target`` to fill; when the block ends without
    an error it is renamed into place by :func:`atomic_replace_dir` (an existing ``target``
    wins). On an error the staging folder is removed. The parent folder is created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                    suffix=".tmp"))
    try:
        yield staging
        atomic_replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def append_line(path: str | Path, line: str) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor: concurrent
    writers (tasks on several nodes of a shared file system) never interleave within a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class LockHeld(OSError):
    """Raised by :func:`locked` with ``blocking=False`` when another holder has the lock;
    ``note`` is what that holder wrote into the lock file (may be empty)."""

    def __init__(self, path: Path, note: str) -> None:
        super().__init__(f"{path} is locked by another process" + (f": {note}" if note else ""))
        self.path = path
        self.note = note


class FileLock:
    """A held (or, where the file system refuses locks, merely attempted) lock on ``path``."""

    def __init__(self, path: Path, handle: IO[str] | None, held: bool) -> None:
        self.path = path
        #: False where the file system refused the lock: the block runs unlocked.
        self.held = held
        self._handle = handle

    def note(self, text: str) -> None:
        """Write ``text`` into the lock file (replacing any earlier note), for whoever finds
        it locked: :class:`LockHeld` carries it. Nothing happens where there is no file."""
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.write(text)
            self._handle.flush()

    def release(self) -> None:
        """Clear the note and let go (closing the file releases the flock). Idempotent."""
        if self._handle is None:
            return
        self.note("")
        self._handle.close()
        self._handle = None


def acquire(path: str | Path, *, blocking: bool = True) -> FileLock:
    """Take the lock of :func:`locked` without a ``with`` block (e.g. for a server's
    lifetime); call :meth:`FileLock.release` when done."""
    path = Path(path)
    try:
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
    except OSError:  # cannot even create the lock file (read-only folder): run unlocked
        return FileLock(path, None, held=False)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        note = ""
        with contextlib.suppress(OSError, UnicodeDecodeError):
            handle.seek(0)
            note = handle.read(4096).strip()
        handle.close()
        raise LockHeld(path, note) from None
    except OSError:  # ENOLCK, EOPNOTSUPP...: the file system does not do locks
        return FileLock(path, handle, held=False)
    return FileLock(path, handle, held=True)


@contextlib.contextmanager
def locked(path: str | Path, *, blocking: bool = True) -> Iterator[FileLock]:
    """An exclusive advisory lock on the file ``path`` (created if absent) for the block.

    ``blocking``: wait for another holder (True) or raise :class:`LockHeld` at once (False).
    Where the file system refuses locks the block runs unlocked (``FileLock.held`` is False):
    callers must stay correct without the lock, which only saves duplicate work.
    """
    lock = acquire(path, blocking=blocking)
    try:
        yield lock
    finally:
        lock.release()
