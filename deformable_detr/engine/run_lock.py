"""One training run per run directory: an exclusive lock held while the run writes there."""
import json
import os
import socket
from typing import Optional

from ..errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no mutual exclusion there
    fcntl = None

LOCK_NAME = ".train.lock"


class RunDirectoryBusyError(UserError, RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    """``flock`` on ``run_dir/.train.lock``, taken by the process that writes checkpoints. The
    kernel releases it when that process dies (however it dies), so it is never stale; the file
    records the holder's host and pid for the message a second run gets."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirectoryBusyError(
                    f"hydra.run.dir={os.path.dirname(self.path)} is in use by another training run ({holder}); "
                    "wait for it to finish or stop it, or train into another directory"
                ) from None
            if _same_file(fd, self.path):
                break
            # the holder released and removed the file between our open and flock: lock the path's new file
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and unlock: a run that ended cleanly leaves no lock file behind."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {holder['host']}, pid {holder['pid']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
