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
