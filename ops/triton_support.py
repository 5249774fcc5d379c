"""Where the Triton implementation can run, and its loading.

It needs nothing built at install time: torch's bundled Triton compiles the kernels for the GPU at
their first call. On the CPU it runs only in Triton's interpreter, which must be switched on
before the kernels are loaded (``TRITON_INTERPRET=1`` in the environment before the process
imports this package; tests start a subprocess for it). Triton is imported only where it can run
(a visible GPU, or the interpreter switched on), so a CPU-only process never pays for it.
"""
import os

import torch

INTERPRET_VARIABLE = "TRITON_INTERPRET"
# the values Triton itself reads as true
_TRUE = ("1", "true", "on", "yes", "y")

_module = None
_error = None
_tried = False


def interpreter_requested() -> bool:
    """Whether the environment asks for Triton's interpreter."""
    return os.environ.get(INTERPRET_VARIABLE, "").strip().lower() in _TRUE


def _worth_loading() -> bool:
    return interpreter_requested() or torch.cuda.is_available()


def load():
    """The ``triton_op`` module (the operators defined), or None with ``error()`` saying why.

    Tried once per process; only where Triton can run."""
    global _module, _error, _tried
    if _tried:
        return _module
    _tried = True
    if not _worth_loading():
        _error = f"no GPU is visible and Triton's interpreter is off ({INTERPRET_VARIABLE}=1 switches it on)"
        return None
    try:
        from . import triton_op
    except Exception as exception:  # no Triton, or one too old for these kernels
        _error = f"Triton is not usable ({type(exception).__name__}: {exception})"
        return None
    _module = triton_op
    return _module


def error():
    """Why the Triton implementation cannot run here (None when it can somewhere)."""
    load()
    return _error


def interpreted() -> bool:
    """Whether the loaded kernels run in Triton's interpreter."""
    module = load()
    return module is not None and module.INTERPRETED


def available(device_type: str) -> bool:
    """Whether the Triton implementation runs on tensors of ``device_type`` ("cpu" or "cuda"):
    on CUDA with Triton and a visible GPU (or in the interpreter), on the CPU in the interpreter."""
    module = load()
    if module is None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and module.INTERPRETED
