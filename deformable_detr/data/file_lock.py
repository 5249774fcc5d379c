"""An exclusive lock between processes on one machine, held through a lock file."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: callers must stay correct without mutual exclusion
    fcntl = None

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: str, timeout_s: Optional[float] = None, poll_s: float = 0.2) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block.

    The operating system drops the lock when its holder exits, so a crashed process never
    leaves a stale lock behind. Raises ``TimeoutError`` after ``timeout_s`` seconds of
    waiting (``None``: wait indefinitely). Where ``flock`` is unavailable this does not lock.
    """
    if fcntl is None:
        yield
        return
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {timeout_s:.0f} s for the lock {path}, held by another process; "
                        "wait for that process to finish or stop it"
                    ) from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        os.close(handle)
