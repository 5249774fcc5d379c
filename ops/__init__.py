"""Multi-scale deformable attention (Deformable DETR), with compiled CPU and CUDA kernels,
Triton kernels and a pure-PyTorch reference.

    from deformable_detr_ops import ms_deform_attn
    output = ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

``dropout`` is ``torch.nn.functional.dropout`` with a one-pass CPU kernel, and ``linear_relu_dropout``
a feed-forward network's hidden layer with its bias, ReLU and dropout in one such pass
(ops/hash_dropout.py).

Importing never fails: without a usable build, one warning says how to build and
everything runs Triton on a GPU, or the reference.
"""
from .extension import BUILD_HINT, library_error, library_loaded
from .dispatch import (
    IMPLEMENTATION_VARIABLE,
    IMPLEMENTATIONS,
    KERNEL_DTYPES,
    available_implementations,
    implementation_for,
    kernel_available,
    ms_deform_attn,
    triton_available,
)
from .reference import ms_deform_attn_reference
from .hash_dropout import dropout, linear_relu_dropout, register as _register_dropout

_register_dropout()

__all__ = [
    "BUILD_HINT",
    "IMPLEMENTATION_VARIABLE",
    "IMPLEMENTATIONS",
    "KERNEL_DTYPES",
    "available_implementations",
    "dropout",
    "implementation_for",
    "kernel_available",
    "library_error",
    "library_loaded",
    "linear_relu_dropout",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "triton_available",
]
