"""Multi-scale deformable attention with one entry point over three implementations.

Legend: N batch, S = sum_l H_l * W_l value tokens, M heads, D channels per head,
Lq queries, L levels, P sampling points per level and head.
"""
import torch

from . import extension, flops, kernel
from .reference import ms_deform_attn_reference
from .validation import prepare_inputs

IMPLEMENTATIONS = ("auto", "kernel", "reference")

# dtypes of the compiled kernels, per device type.
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

if extension.library_loaded():
    kernel.register()


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


def available_implementations():
    """What can run here, per device type, e.g. {"cpu": ["kernel", "reference"], "cuda": ["reference"]}.

    "cuda" appears when torch has CUDA, whether or not a GPU is visible; "kernel" when the
    compiled kernel for that device is loaded (see ``KERNEL_DTYPES`` for its dtypes)."""
    device_types = ["cpu"] + (["cuda"] if torch.backends.cuda.is_built() else [])
    return {
        device_type: (["kernel"] if kernel_available(device_type) else []) + ["reference"]
        for device_type in device_types
    }


def implementation_for(value):
    """The implementation that ``implementation="auto"`` picks for a value tensor: "kernel" or "reference"."""
    return "kernel" if kernel_available(value.device.type, value.dtype) else "reference"


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
        implementation: "auto" (the compiled kernel when built for the device and dtype,
            else the reference), "kernel" (the compiled kernel or RuntimeError) or "reference".

    Returns:
        (N, Lq, M * D), differentiable w.r.t. value, sampling_locations and attention_weights.
        With no levels (L = 0, so S = 0) it is zeros, and backward gives zero gradients.

    Compiled kernels: CPU float32/float64, CUDA float16/bfloat16/float32/float64 (half types
    accumulate in float32). Mixed floating dtypes are promoted (float16 value with float32
    locations computes in float32). Inputs need not be contiguous. With a build, the op is a
    torch.library custom op that ``torch.compile(fullgraph=True)`` and ``torch.export`` trace.

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
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    if implementation == "auto":
        implementation = implementation_for(value)
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
