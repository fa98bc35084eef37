"""The run folder's safety: claim it (refuse to clobber a run, one writer at a time), and stop cleanly.

:func:`claim_run_dir` is what ``srigl train`` does to ``--out`` before writing anything there:

* ``--out`` naming an existing file is refused; a folder that cannot be created or written is
  refused with the reason (read-only, permission denied), never a traceback;
* a folder that already holds a run (any of :data:`RUN_FILES`) is refused unless the run is
  resumed (``--resume``) or replaced (``--overwrite``, which first deletes that run's files, so
  that a replacement cut short never leaves a folder that mixes two runs);
* an exclusive, non-blocking ``flock`` on ``<out>/.srigl.lock`` makes a second ``srigl train``
  on the same folder fail at once, naming the process that holds it. The kernel drops the lock
  when its holder exits, however it exits, so a killed run never leaves a stale lock behind.
  (Where ``fcntl`` does not exist, on Windows, there is no lock.)

:class:`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM into a request that the training loop
checks between whole steps, so the checkpoint written on the way out is one a run could have
written anyway (see :func:`srigl.app.train.train`).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from srigl.errors import InvalidConfigError

# The files whose presence means "this folder holds a run" (``srigl train`` writes them).
RUN_FILES = ("config.toml", "metrics.csv", "summary.json", "checkpoints/last.pt")
# What ``--overwrite`` deletes before the new run starts: the run files and the plot.
REPLACED_FILES = (*RUN_FILES, "curves.png")
LOCK_NAME = ".srigl.lock"


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.srigl.lock``, held until :meth:`release` (or exit)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise InvalidConfigError(f"cannot write into the run folder {str(run_dir)!r}: {error.strerror}") from None
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; the refusal of existing runs still holds
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise InvalidConfigError(
                f"another `srigl train` (pid {holder}) is using the run folder {str(run_dir)!r}; "
                "wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (closing the file does); the lock file stays, empty of meaning."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def claim_run_dir(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Create ``run_dir`` if needed, lock it, and refuse to start a new run over an existing one.

    Args:
        run_dir: the run folder (``--out``).
        resume: the run continues what the folder holds (``--resume``).
        overwrite: a new run replaces the one in the folder (``--overwrite``): its files are deleted.

    Returns:
        The held lock; call :meth:`RunLock.release` when the run ends.

    Raises:
        InvalidConfigError: ``run_dir`` is a file, cannot be created or written, is locked by another
            process, or holds a run while neither ``resume`` nor ``overwrite`` is set.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InvalidConfigError(f"the run folder {str(run_dir)!r} is an existing file; give --out a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidConfigError(f"cannot create the run folder {str(run_dir)!r}: {error.strerror}") from None
    lock = RunLock(run_dir)  # before looking: a run finishing meanwhile in another process is seen below
    if resume:
        return lock
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        lock.release()
        raise InvalidConfigError(
            f"{str(run_dir)!r} already holds a run ({', '.join(found)}); continue it with "
            f"`srigl train --resume {run_dir}`, or pass --overwrite to replace it"
        )
    for name in REPLACED_FILES:
        try:
            (run_dir / name).unlink(missing_ok=True)
        except OSError as error:
            lock.release()
            raise InvalidConfigError(f"--overwrite cannot delete {str(run_dir / name)!r}: {error.strerror}") from None
    return lock


class StopSignals:
    """A context manager that turns SIGINT and SIGTERM into :attr:`received` (the first signal's number).

    The handlers only record: nothing is raised inside a step, a save or an evaluation, and a second
    Ctrl-C while the checkpoint is being written is recorded and ignored, so the save completes.
    The previous handlers come back on exit (``train`` is also called in-process, e.g. by tests).
    Outside the main thread, where Python cannot install handlers, nothing changes; neither does a
    signal that is ignored (``SIG_IGN``, as ``nohup`` and background jobs have SIGINT).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # ignored on purpose (nohup, a background job): stays ignored
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
