"""Files replaced atomically: readers see the previous complete file or the new one, never a partial write."""
import contextlib
import json
import os
import tempfile
from typing import IO, Any, Callable


def umask_permissions(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: the permissions ``open`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def replace_atomically(path: str, write: Callable[[IO], None], *, binary: bool, prefix: str, suffix: str, permissions: int) -> None:
    """Create ``path`` through ``write(stream)``: into a temporary file ``prefix``XXXXXXXX``suffix``
    in the same directory (so the rename stays on one file system), flushed and fsynced, given
    ``permissions`` (it is private until then), then renamed over ``path``. The temporary file is
    removed whatever went wrong, and the error raised."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        with os.fdopen(handle, "wb") if binary else os.fdopen(handle, "w", encoding="utf-8") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, permissions)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path``, atomically (see ``replace_atomically``); the file is
    readable by all, as predictions and metrics are ordinary output."""
    path = os.fspath(path)
    replace_atomically(path, lambda stream: json.dump(data, stream), binary=False,
                       prefix=f".{os.path.basename(path)}.", suffix=".tmp", permissions=0o644)
