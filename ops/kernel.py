"""The compiled operators as PyTorch sees them: fake (shape-only) implementations
for ``torch.compile`` / ``torch.export``, and autograd.

The operators themselves are defined in C++ (ops/csrc/library.cpp):
    deformable_attention::ms_deform_attn_forward(value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights) -> (N, Lq, M * D)
    deformable_attention::ms_deform_attn_backward(..., grad_output)
        -> (grad_value, grad_sampling_locations, grad_attention_weights)
"""
import torch

from . import flops

FORWARD = "deformable_attention::ms_deform_attn_forward"
BACKWARD = "deformable_attention::ms_deform_attn_backward"

_registered = False


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    # The kernels return contiguous gradients whatever the input strides.
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.deformable_attention.ms_deform_attn_backward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    )
    return grad_value, None, None, grad_locations, grad_weights


def _setup_nothing(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "ms_deform_attn: the compiled kernel has no double backward; use implementation='reference' for it"
    )


def register():
    """Registers the fake implementations, autograd and FLOP formulas of the loaded C++ operators (idempotent)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake(FORWARD)(_forward_fake)
    torch.library.register_fake(BACKWARD)(_backward_fake)
    torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)
    torch.library.register_autograd(BACKWARD, _no_double_backward, setup_context=_setup_nothing)
    flops.register()
    _registered = True


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Calls the compiled forward; shapes as in ``ms_deform_attn``."""
    return torch.ops.deformable_attention.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
