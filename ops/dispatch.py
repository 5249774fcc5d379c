"""Multi-scale deformable attention with one entry point over three implementations: the compiled
kernels ("kernel", ops/csrc), Triton kernels ("triton", ops/triton_kernels.py) and the pure-PyTorch
reference ("reference").

Legend: N batch, S = sum_l H_l * W_l value tokens, M heads, D channels per head,
Lq queries, L levels, P sampling points per level and head.
"""
import os

import torch

from . import extension, flops, kernel, triton_support
from .reference import ms_deform_attn_reference
from .validation import common_dtype, prepare_inputs, promote_dtypes

IMPLEMENTATIONS = ("auto", "kernel", "triton", "reference")

# Set to kernel, triton or reference to make implementation="auto" (what the model uses) pick it.
IMPLEMENTATION_VARIABLE = "MS_DEFORM_ATTN_IMPLEMENTATION"

TRITON_HINT = ("it needs a CUDA GPU and Triton (bundled with torch's CUDA builds); on the CPU set "
               "TRITON_INTERPRET=1 before starting Python to run it in Triton's interpreter (slow: for tests)")

# dtypes of the compiled kernels, per device type.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

if extension.library_loaded():
    kernel.register()
# Where Triton can run, its operators are defined now rather than at a first call inside a
# torch.compile trace; elsewhere this returns at once without importing Triton.
triton_support.load()


def kernel_available(device="cpu", dtype=None):
    """Whether the compiled kernel runs on ``device`` (a type such as "cpu", "cuda" or a torch.device),
    and for ``dtype`` when one is given."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        built = extension.library_loaded()
    elif device_type == "cuda":
        built = extension.cuda_compiled()
    else:
        built = False
    return built and (dtype is None or dtype in KERNEL_DTYPES[device_type])


def triton_available(device="cuda"):
    """Whether the Triton implementation runs on ``device`` (a type or a torch.device): on CUDA where
    Triton is installed and a GPU is visible, on the CPU in Triton's interpreter (TRITON_INTERPRET=1
    before this package is imported)."""
    return triton_support.available(torch.device(device).type)


def available_implementations():
    """What can run here, per device type, e.g. {"cpu": ["kernel", "reference"], "cuda": ["kernel", "triton",
    "reference"]}.

    "cuda" appears when torch has CUDA, whether or not a GPU is visible; "kernel" when the
    compiled kernel for that device is loaded (see ``KERNEL_DTYPES`` for its dtypes); "triton"
    where ``triton_available`` says so."""
    device_types = ["cpu"] + (["cuda"] if torch.backends.cuda.is_built() else [])
    return {
        device_type: (["kernel"] if kernel_available(device_type) else [])
        + (["triton"] if triton_available(device_type) else [])
        + ["reference"]
        for device_type in device_types
    }


def _requested_implementation():
    name = os.environ.get(IMPLEMENTATION_VARIABLE, "").strip()
    if name in ("", "auto"):
        return None
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPLEMENTATION_VARIABLE}={name} is not one of {', '.join(IMPLEMENTATIONS)}")
    return name


def implementation_for(value, dtype=None):
    """The implementation that ``implementation="auto"`` picks for a value tensor, computing in
    ``dtype`` (default value's; the op computes in the promotion of its inputs' dtypes).

    The one named by the environment variable MS_DEFORM_ATTN_IMPLEMENTATION when set; else the
    compiled kernel when it is built for the device and dtype; else, on a GPU, Triton when it can
    run; else the reference. (Triton's interpreter is never picked on the CPU: it is for tests.)"""
    requested = _requested_implementation()
    if requested is not None:
        return requested
    device_type = value.device.type
    if kernel_available(device_type, dtype or value.dtype):
        return "kernel"
    if device_type == "cuda" and triton_available(device_type):
        return "triton"
    return "reference"


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *,
                   implementation="auto"):
    """Multi-scale deformable attention: per query and head, the attention-weighted sum of the
    value bilinearly sampled at L * P locations across the levels.

    Args:
        value: (N, S, M, D), the flattened feature maps of all levels.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level; sum_l H_l * W_l = S.
        level_start_index: (L,) int64, first token of each level in S.
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1], normalized (x, y) with pixel centres
            at (i + 0.5) / W_l; samples outside the level read zeros (bilinear, zero padding).
            A sample with a NaN or infinite coordinate contributes zero to the output and gets
            zero gradients (its location and its attention weight), in every implementation.
        attention_weights: (N, Lq, M, L, P).
        implementation: "auto" (see ``implementation_for``: the compiled kernel when built for the
            device and dtype, else Triton on a GPU, else the reference), "kernel" (the compiled
            kernel or RuntimeError), "triton" (the Triton kernels or RuntimeError) or "reference".

    Returns:
        (N, Lq, M * D), differentiable w.r.t. value, sampling_locations and attention_weights.
        With no levels (L = 0, so S = 0) it is zeros, and backward gives zero gradients.

    Compiled kernels: CPU float32/float64, CUDA float16/bfloat16/float32/float64 (half types
    accumulate in float32). Triton kernels: any of those dtypes, also mixed, accumulating in
    float32 (float64 when an input is float64). Mixed floating dtypes are promoted (float16 value
    with float32 locations computes in float32 and returns float32); the Triton kernels read each
    input in its own dtype instead of converting it first, with the same result. Inputs need not be
    contiguous. With a build (or Triton), the op is a torch.library custom op that
    ``torch.compile(fullgraph=True)`` and ``torch.export`` trace.

    Raises:
        ValueError: an argument has the wrong shape, dtype or device, or value's S differs from
            sum_l H_l * W_l of spatial_shapes. That last check reads spatial_shapes: free on the
            CPU; for a GPU tensor one wait per tensor (the last one read is remembered, so a
            model passing one tensor to every layer waits once per forward). In a compiled
            graph the CPU kernel and the reference check at run time; the CUDA kernel, which
            cannot without waiting for the GPU, reads the tokens it covers and ignores the rest.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"ms_deform_attn: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = prepare_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, promote=False
    )
    if implementation == "auto":
        # by the dtype computed in: a bfloat16 value from autocast next to float32 locations computes in float32
        implementation = implementation_for(value, common_dtype(value, sampling_locations, attention_weights))
    if implementation == "triton":
        # the Triton kernels read mixed dtypes as they are; the others get them promoted below
        if not triton_available(value.device.type):
            raise RuntimeError(
                f"ms_deform_attn: the Triton implementation cannot run on {value.device.type} tensors here "
                f"({triton_support.error() or 'the kernels are compiled for the GPU'}); {TRITON_HINT}"
            )
        return triton_support.load().ms_deform_attn_triton(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    value, sampling_locations, attention_weights = promote_dtypes(value, sampling_locations, attention_weights)
    if implementation == "kernel":
        if not kernel_available(value.device.type, value.dtype):
            raise RuntimeError(
                f"ms_deform_attn: no compiled kernel for {value.device.type} {value.dtype} "
                f"(library: {extension.library_error() or 'loaded'}). {extension.BUILD_HINT}"
            )
        return kernel.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    output = ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    # the reference's grid_sample and sums have no FLOP formula: it reports itself as the op, once
    flops.count_reference(output, value, sampling_locations)
    return output
