"""srigl.io.atomic: the one atomic write behind checkpoints and saved models."""

from __future__ import annotations

import os
import stat

import pytest

from srigl.io.atomic import atomic_write


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "file.bin"
    assert atomic_write(path, lambda f: f.write(b"old")) == path
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]  # no temporary file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_mode_is_set_when_given_else_the_umask_decides(tmp_path):
    shared = atomic_write(tmp_path / "shared.bin", lambda f: f.write(b"x"), mode=0o644)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    umask = os.umask(0o077)
    try:
        private = atomic_write(tmp_path / "private.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "file.bin", lambda f: f.write(b"x"))


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_write_removes_orphans_of_killed_writes_only(tmp_path):
    # L18 (issue #14): each write killed mid-way left a hidden full-size temporary behind for good.
    import time

    from srigl.io import atomic

    target = tmp_path / "last.pt"
    dead, old = _dead_pid(), time.time() - 3600
    orphans = [tmp_path / f".last.pt.{dead}.{i:08x}.tmp" for i in (1, 2)]
    kept = [
        tmp_path / f".last.pt.{os.getpid()}.0000000a.tmp",  # this process's: a write in progress
        tmp_path / f".last.pt.{dead}.0000000b.tmp",  # modified after this process loaded srigl
        tmp_path / f".other.pt.{dead}.0000000c.tmp",  # another target's
        tmp_path / f".last.pt.{dead}.zz.tmp",  # not srigl's name pattern
        tmp_path / "notes.tmp",
    ]
    for path in orphans + kept:
        path.write_bytes(b"x" * 100)
    for path in orphans + kept[:1] + kept[2:]:
        os.utime(path, (old, old))
    kept[1].touch()
    assert atomic._STARTED < time.time()
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in kept)
