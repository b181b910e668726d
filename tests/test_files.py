"""debias.files: atomic writes leave the old file or the new one, folders land whole, and a
lock held elsewhere is refused with its holder's note."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from debias.files import (
    LockHeld,
    acquire,
    atomic_dir,
    atomic_output,
    atomic_replace_dir,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    locked,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_replace_whole_and_keep_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "a.csv"
    atomic_write_text(target, "x;y\r\n1;2\r\n")
    assert target.read_bytes() == b"x;y\r\n1;2\r\n"  # no newline translation
    target.chmod(0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o640
    atomic_torch_save(tmp_path / "t.pt", {"w": torch.arange(3)})
    assert torch.load(tmp_path / "t.pt", weights_only=True)["w"].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("half way")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_a_folder_lands_whole_and_the_first_one_wins(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "overlays"
    with atomic_dir(target) as staging:
        (staging / "0.png").write_bytes(b"first")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "0.png").read_bytes() == b"first"
    with atomic_dir(target) as staging:
        (staging / "0.png").write_bytes(b"second")
    assert (target / "0.png").read_bytes() == b"first"  # an existing folder is kept
    assert sorted(p.name for p in target.parent.iterdir()) == ["overlays"]
    with pytest.raises(ValueError, match="boom"), atomic_dir(tmp_path / "other") as staging:
        raise ValueError("boom")
    assert not (tmp_path / "other").exists() and not staging.exists()
    lone = tmp_path / "lone"
    lone.mkdir()
    assert atomic_replace_dir(lone, tmp_path / "moved") and (tmp_path / "moved").is_dir()


def test_a_held_lock_is_refused_with_its_note_and_free_again_after(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with locked(path) as first:
        assert first.held
        first.note("http://127.0.0.1:1234/")
        with pytest.raises(LockHeld) as caught, locked(path, blocking=False):
            pass
        assert caught.value.note == "http://127.0.0.1:1234/"
    second = acquire(path, blocking=False)  # released: free again, and the note is cleared
    try:
        assert second.held and path.read_text() == ""
    finally:
        second.release()
        second.release()  # idempotent


def test_a_file_system_without_locks_runs_unlocked(tmp_path: Path, monkeypatch) -> None:
    import errno
    import fcntl

    def no_locks(handle: object, flags: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with locked(tmp_path / "x.lock") as lock, locked(tmp_path / "x.lock", blocking=False) as again:
        assert not lock.held and not again.held  # both run, unlocked, as documented
    with locked(tmp_path / "no-such-folder" / "x.lock") as lock:  # cannot even create it
        assert not lock.held
