"""The one atomic file write: a crash, kill or exception leaves either the old file or the new one.

The data goes to a hidden temporary file in the target's directory, which is flushed, fsynced and
renamed onto the target (``os.replace`` is atomic on POSIX and Windows); the directory is then
fsynced so that the rename itself is durable.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write"]


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
