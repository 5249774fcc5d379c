"""Loading of the compiled kernels (``deformable_detr_ops._C``, built from ``ops/csrc`` on install):
at most one warning, never an error.

The library defines ``torch.ops.deformable_attention.ms_deform_attn_forward`` and
``..._backward`` with CPU (float32, float64) and, when built with CUDA, CUDA
(float16, bfloat16, float32, float64) kernels, and ``torch.ops.hash_dropout.dropout``,
``relu_dropout`` and ``relu_dropout_backward`` (CPU, see hash_dropout.py). When it is
missing, disabled or unusable, ``ms_deform_attn`` runs the pure-PyTorch reference instead,
and ``dropout`` PyTorch's.
"""
import importlib.machinery
import importlib.util
import os
import sys
import warnings

import torch

# Set to 1 to skip the compiled kernels (no warning): everything runs the reference.
DISABLE_VARIABLE = "MS_DEFORM_ATTN_NO_EXTENSION"

BUILD_HINT = (
    "Build them against the installed torch with `pip install --no-build-isolation -e .` from the repository "
    "root (or `bash scripts/build_ops.sh`); a GPU is not needed to compile the CUDA kernel."
)

_MODULE = __name__.rsplit(".", 1)[0] + "._C"


def _major_minor(version):
    return tuple(version.split("+")[0].split(".")[:2])


def _load():
    """Returns (module or None, reason it is not usable or None, whether to warn)."""
    if os.environ.get(DISABLE_VARIABLE, "").strip() not in ("", "0"):
        return None, f"disabled by {DISABLE_VARIABLE}", False
    # Only a library next to these sources is theirs: a finder that maps the package name
    # elsewhere (an editable install of another checkout) must not hand us its build.
    spec = importlib.machinery.PathFinder.find_spec(_MODULE, [os.path.dirname(os.path.abspath(__file__))])
    if spec is None:
        return None, "not built", True
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_MODULE] = module
    except Exception as error:  # e.g. undefined symbols of a build against another torch
        return None, f"not loadable ({type(error).__name__}: {error})", True
    built_against = getattr(module, "torch_version", "unknown")
    if _major_minor(built_against) != _major_minor(torch.__version__):
        return None, f"built against torch {built_against} but torch {torch.__version__} is installed", True
    return module, None, False


_module, _error, _warn = _load()
if _warn:
    warnings.warn(
        f"ms_deform_attn: the compiled kernels are {_error}; using the pure-PyTorch reference, "
        f"which is much slower and uses much more memory. {BUILD_HINT}",
        RuntimeWarning,
    )


def library_loaded():
    """Whether the compiled library is loaded (it always has the CPU kernel)."""
    return _module is not None


def library_error():
    """Why the compiled library is not used (e.g. "not built"), or None when it is loaded."""
    return _error


def cuda_compiled():
    """Whether the loaded library has the CUDA kernel compiled in."""
    return _module is not None and bool(getattr(_module, "with_cuda", 0))
