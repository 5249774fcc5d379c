"""The Triton implementation of multi-scale deformable attention as ``torch.library`` operators.

    deformable_attention::ms_deform_attn_triton_forward(value, spatial_shapes, level_start_index,
        sampling_locations, attention_weights) -> (N, Lq, M * D)
    deformable_attention::ms_deform_attn_triton_backward(..., grad_output, grad_value_wanted)
        -> (grad_value, grad_sampling_locations, grad_attention_weights)

On a GPU they are ``torch.library.triton_op``: ``torch.compile`` sees the Triton kernels inside
them (Inductor schedules them with the rest of the graph) and ``torch.export`` keeps them as one
operator. Under Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported) they
are plain custom operators with shape-only fakes: the interpreter cannot run on fake tensors, and
compiled code can only call it opaquely.

Inputs keep their dtypes: the kernels read a float16/bfloat16 value next to float32 locations and
weights (what autocast produces) without a converted copy, sum in float32 (float64 when any input
is float64), and write the output in the promoted dtype, as the other implementations return it.
Importing this module imports Triton; ``triton_support.py`` decides when.

Legend: N batch, S value tokens, M heads, D channels per head, Lq queries, L levels, P points.
"""
import warnings
from typing import Tuple

import torch
import triton
from torch.library import wrap_triton

from . import flops
from .triton_kernels import ms_deform_attn_backward_kernel, ms_deform_attn_forward_kernel

FORWARD = "deformable_attention::ms_deform_attn_triton_forward"
BACKWARD = "deformable_attention::ms_deform_attn_triton_backward"

# The kernels were decorated for Triton's interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = type(ms_deform_attn_forward_kernel).__name__ == "InterpretedFunction"

_HALF_TYPES = (torch.float16, torch.bfloat16)


def launch_config(channels: int, backward: bool) -> dict:
    """Block sizes and warps for D channels per head.

    A forward program covers BLOCK_Q queries x BLOCK_D channels of one head (the channel blocks
    are separate programs); a backward program covers BLOCK_Q queries and loops over channel
    blocks, so that the location and weight gradients are summed in registers and written once.
    """
    block_d = min(triton.next_power_of_2(max(channels, 1)), 64)
    if INTERPRETED:
        # the interpreter runs programs one after another: fewer, larger ones are faster
        return dict(BLOCK_Q=32, BLOCK_D=block_d)
    block_q = 64 if block_d <= 32 else 32
    if backward:
        block_q //= 2  # four corner tiles, the gradient tile and the dot products live at once
    return dict(BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4)


def _float64(*tensors) -> bool:
    """Whether the kernels sum in float64 (else float32): when any input is float64."""
    return any(t.dtype == torch.float64 for t in tensors)


def _result_dtype(value, sampling_locations, attention_weights) -> torch.dtype:
    return torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)


def _forward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
             sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Shapes as ``ms_deform_attn``; the arguments checked by ``validation.prepare_inputs``."""
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    output = value.new_empty((batch, queries, heads * channels),
                             dtype=_result_dtype(value, sampling_locations, attention_weights))
    if output.numel() == 0:
        return output
    if levels == 0:
        return output.zero_()
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        t.contiguous() for t in (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    )
    config = launch_config(channels, backward=False)
    grid = (triton.cdiv(queries, config["BLOCK_Q"]), batch * heads, triton.cdiv(channels, config["BLOCK_D"]))
    wrap_triton(ms_deform_attn_forward_kernel)[grid](
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, output,
        tokens, queries, heads, channels,
        LEVELS=levels, POINTS=points, FLOAT64=_float64(output), **config,
    )
    return output


def _backward(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
              sampling_locations: torch.Tensor, attention_weights: torch.Tensor, grad_output: torch.Tensor,
              grad_value_wanted: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients in the dtypes of value, sampling_locations and attention_weights; grad_value is
    empty (0 elements) unless ``grad_value_wanted``."""
    batch, tokens, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output = (
        t.contiguous()
        for t in (value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)
    )
    # value gradients are scattered with atomics: into a zero-filled float32 buffer for half types
    sum_dtype = torch.float32 if value.dtype in _HALF_TYPES else value.dtype
    grad_value_sum = value.new_zeros(value.shape if grad_value_wanted else (0,), dtype=sum_dtype)
    # every element is written by the kernel (no zero-filling), except with nothing to launch
    grad_locations = torch.empty_like(sampling_locations)
    grad_weights = torch.empty_like(attention_weights)
    if grad_weights.numel() == 0:
        pass
    elif levels == 0 or heads == 0:
        grad_locations.zero_()
        grad_weights.zero_()
    else:
        config = launch_config(channels, backward=True)
        grid = (triton.cdiv(queries, config["BLOCK_Q"]), batch * heads)
        wrap_triton(ms_deform_attn_backward_kernel)[grid](
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
            grad_value_sum, grad_locations, grad_weights,
            tokens, queries, heads, channels,
            LEVELS=levels, POINTS=points, FLOAT64=_float64(value, sampling_locations, attention_weights),
            GRAD_VALUE=grad_value_wanted, **config,
        )
    return grad_value_sum.to(value.dtype), grad_locations, grad_weights


def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels),
                           dtype=_result_dtype(value, sampling_locations, attention_weights))


def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
                   grad_value_wanted):
    return (
        value.new_empty(value.shape if grad_value_wanted else (0,)),
        torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
        torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
    )


def _define(name, function, fake):
    if INTERPRETED:
        operator = torch.library.custom_op(name, function, mutates_args=())
        operator.register_fake(fake)
        return operator
    # traced for its fake too: wrap_triton launches nothing on fake tensors
    return torch.library.triton_op(name, function, mutates_args=())


def _alert_not_deterministic(value):
    """What torch does for its own nondeterministic CUDA operators under
    ``torch.use_deterministic_algorithms(True)``: an error, or a warning with ``warn_only``."""
    if not (value.is_cuda and torch.are_deterministic_algorithms_enabled()):
        return
    message = ("ms_deform_attn_triton_backward does not have a deterministic implementation (value gradients are "
               "summed with atomics); use implementation='reference' where determinism is required")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning)
    else:
        raise RuntimeError(message)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _autograd_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value_wanted = ctx.needs_input_grad[0]
    if grad_value_wanted:
        _alert_not_deterministic(value)
    grad_value, grad_locations, grad_weights = backward_operator(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output, grad_value_wanted
    )
    return (grad_value if grad_value_wanted else None), None, None, grad_locations, grad_weights


def _no_double_backward(ctx, *grads):
    raise RuntimeError("ms_deform_attn: the Triton kernels have no double backward; use implementation='reference' for it")


def _setup_nothing(ctx, inputs, output):
    pass


forward_operator = _define(FORWARD, _forward, _forward_fake)
backward_operator = _define(BACKWARD, _backward, _backward_fake)
forward_operator.register_autograd(_autograd_backward, setup_context=_setup_context)
backward_operator.register_autograd(_no_double_backward, setup_context=_setup_nothing)
flops.register_triton()


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The Triton forward, differentiable; arguments as ``ms_deform_attn`` after its checks
    (dtypes are not aligned: see the module docstring)."""
    return forward_operator(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
