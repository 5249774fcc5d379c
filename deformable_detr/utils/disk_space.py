"""Disk space: how much is free, and whether a failed write means that the disk (or quota) is full."""
import errno
import os
import shutil
from typing import Optional

# a full disk, an exhausted quota, a file larger than the file system allows
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch.save's zip writer (inline_container.cc) reports a write that failed underneath it with
# these: "[enforce fail at inline_container.cc:...] . unexpected pos N vs M" once the stream came
# up short, "basic_ios::clear: iostream error" when it wrote to a path itself
_ZIP_WRITER_FAILURES = ("unexpected pos", "iostream error")


def disk_full_errno(error: BaseException) -> Optional[int]:
    """ENOSPC, EDQUOT or EFBIG when ``error``, or an exception it was raised while handling, says a
    write ran out of space; None otherwise.

    torch.save into a Python file raises OSError(ENOSPC) from the file's ``write`` and then, while
    closing its zip archive, ``RuntimeError: ... unexpected pos`` with that OSError as its context;
    a zip-writer failure with no OSError underneath (torch.save to a path) counts as ENOSPC. An
    OSError of another errno (e.g. EIO) means something else went wrong.
    """
    seen = set()
    writer_failed = False
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno if error.errno in DISK_FULL_ERRNOS else None
        if isinstance(error, RuntimeError) and any(failure in str(error) for failure in _ZIP_WRITER_FAILURES):
            writer_failed = True
        error = error.__cause__ or error.__context__
    return errno.ENOSPC if writer_failed else None


def free_bytes(path: str) -> Optional[int]:
    """Bytes free to this user on the file system holding ``path`` (or its nearest existing
    parent); None when that cannot be told."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def format_bytes(count: int) -> str:
    """E.g. ``812 bytes``, ``3.4 MiB``, ``1.2 GiB``."""
    if count < 1024:
        return f"{count} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:,.1f} {unit}"
