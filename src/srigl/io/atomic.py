"""The one atomic file write: a crash, kill or exception leaves either the old file or the new one.

The data goes to a hidden temporary file in the target's directory, which is flushed, fsynced and
renamed onto the target (``os.replace`` is atomic on POSIX and Windows); the directory is then
fsynced so that the rename itself is durable.

A process killed during a write leaves its temporary file (as large as the file it was writing).
The next write of the same target removes such orphans (:func:`remove_stale_temporaries`): files
named exactly like srigl's own temporaries of that target, written by a process that no longer
runs, and last modified before this process loaded srigl, so that a write in progress is never
touched.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "remove_stale_temporaries"]

# When this process loaded srigl.io: a temporary file last modified before that is not this
# process's, and one from a write in progress elsewhere would be newer (it is being written).
_STARTED = time.time()
# What follows ".<target name>." in a temporary's name: the writer's pid, 8 random hex digits.
_TEMP_SUFFIX = re.compile(r"(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, mode: int | None = None) -> Path:
    """Write ``path`` through ``write(file)`` atomically (its directory must exist).

    Args:
        path: the destination.
        write: writes the contents to the binary file it is given (e.g. ``lambda f: torch.save(obj, f)``).
        mode: permission bits to set on the file; None lets the umask decide (as ``open`` does).

    Returns:
        ``path`` as a Path.

    Raises:
        Whatever ``write`` or the file system raises; the temporary file is removed first and the
        previous file at ``path`` is untouched.
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # O_EXCL: never reuse or follow an existing file; 0o666 so the umask decides permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists but belongs to someone else, or cannot tell: keep its file
    return True


def remove_stale_temporaries(path: str | os.PathLike, older_than: float | None = None) -> list[Path]:
    """Delete the temporary files that killed writes of ``path`` left behind; return what was deleted.

    Only files named ``.<name>.<pid>.<8 hex digits>.tmp`` next to ``path`` are considered (what
    :func:`atomic_write` creates), and of those only the ones whose writer no longer runs and that
    were last modified before ``older_than`` (default: when this process loaded srigl). A file that
    cannot be examined or deleted is left alone.
    """
    path = Path(path)
    older_than = _STARTED if older_than is None else older_than
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_SUFFIX.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if match is None or _running(int(match["pid"])):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not every platform can open a directory (Windows cannot).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
