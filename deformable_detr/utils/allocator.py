"""glibc's malloc, told to keep freed memory for the next step instead of returning it.

By default glibc serves every block of 32 MiB or more with its own ``mmap`` and unmaps it on
``free``. A training step of a Deformable DETR on the CPU allocates dozens of such blocks (one
feed-forward activation of the r50 recipe at batch 2 of 512x683 is 14,640 x 1,024 floats, 60 MB),
and the next step maps them again: the kernel zeroes every page on its first touch, so a step
spends time in page faults and a product is slower on a fresh block than on a reused one
(docs/benchmarks.md, Design measurements). With ``mmap`` off for allocations and a high trim
threshold, freed blocks go back to malloc's heap and the next step reuses them: no faults after
the first steps, and the process keeps its peak memory (as a GPU's caching allocator does).

The process's own settings win: nothing is changed when the environment already tunes malloc
(``GLIBC_TUNABLES`` with ``glibc.malloc``, ``MALLOC_*_``) or preloads another allocator
(jemalloc, tcmalloc, mimalloc through ``LD_PRELOAD``), or when the C library is not glibc.
"""
import ctypes
import os
import platform

# mallopt parameters of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's default number of simultaneous mmap'ed blocks, restored by return_freed_memory()
DEFAULT_MMAP_MAX = 65536
# free memory at the top of the heap beyond this goes back to the system; far above a step's
# turnover, so that a step's memory stays for the next one
KEEP_BYTES = 1 << 30

_ENVIRONMENT_KEYS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _glibc():
    """The C library through ctypes when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tuned_by_environment(environ=os.environ) -> str:
    """Why the environment's malloc settings stand (the variable that sets them), or ""."""
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    for key in _ENVIRONMENT_KEYS:
        if key in environ:
            return key
    if any(name in environ.get("LD_PRELOAD", "") for name in _PRELOADED_ALLOCATORS):
        return "LD_PRELOAD"
    return ""


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and keep up to 1 GiB of freed memory
    there (see the module's docstring). Returns whether the settings were applied."""
    libc = _glibc()
    if libc is None or tuned_by_environment():
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """The opposite, for measuring memory: blocks of ``threshold`` bytes and more get their own
    mapping again and the heap is trimmed down to ``threshold`` at every free, so that the resident
    set follows the memory in use (slower). Returns whether glibc took the settings."""
    libc = _glibc()
    if libc is None:
        return False
    applied = all(
        libc.mallopt(parameter, value)
        for parameter, value in ((M_MMAP_MAX, DEFAULT_MMAP_MAX), (M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, threshold))
    )
    libc.malloc_trim(0)
    return applied
