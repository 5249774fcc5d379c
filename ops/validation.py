"""Argument checks of ``ms_deform_attn``: shapes, dtypes and devices, plus the one check that
needs the values of ``spatial_shapes`` (value holds sum_l H_l * W_l tokens), made only where
those values are concrete, so nothing here breaks a ``torch.compile`` or ``torch.export`` graph.

Legend: N batch, S value tokens, M heads, D channels per head, Lq queries,
L levels, P sampling points per level and head.
"""
import weakref

import torch

_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def _shape(tensor):
    return tuple(tensor.shape)


def prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, promote=True):
    """Checks the arguments and aligns their dtypes and devices.

    Raises ValueError naming the offending argument. Returns the five tensors with
    value, sampling_locations and attention_weights in one floating dtype (the
    promotion of theirs: mixing float16 value with float32 locations, as autocast
    does, computes in float32) unless ``promote`` is False (then each keeps its own),
    and spatial_shapes / level_start_index as int64 on value's device.
    """
    arguments = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, argument in zip(_NAMES, arguments):
        if not isinstance(argument, torch.Tensor):
            raise ValueError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(argument).__name__}")

    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must have shape (N, S, M, D), got {_shape(value)}")
    batch, _, heads, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must have shape (L, 2), got {_shape(spatial_shapes)}")
    levels = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or level_start_index.shape[0] != levels:
        raise ValueError(
            f"ms_deform_attn: level_start_index must have shape (L,) = ({levels},), got {_shape(level_start_index)}"
        )
    if (
        sampling_locations.dim() != 6
        or sampling_locations.shape[0] != batch
        or sampling_locations.shape[2] != heads
        or sampling_locations.shape[3] != levels
        or sampling_locations.shape[5] != 2
    ):
        raise ValueError(
            f"ms_deform_attn: sampling_locations must have shape (N, Lq, M, L, P, 2) = "
            f"({batch}, Lq, {heads}, {levels}, P, 2), got {_shape(sampling_locations)}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must have shape (N, Lq, M, L, P) = "
            f"{_shape(sampling_locations)[:5]}, got {_shape(attention_weights)}"
        )

    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if not tensor.is_floating_point():
            raise ValueError(f"ms_deform_attn: {name} must be floating point, got {tensor.dtype}")
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"ms_deform_attn: {name} must be an integer tensor (int64), got {tensor.dtype}")
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if tensor.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} must be on value's device {value.device}, got {tensor.device}")

    if _is_concrete(spatial_shapes) and isinstance(value.shape[1], int):
        check_value_tokens(value, _token_count(spatial_shapes))

    if promote:
        value, sampling_locations, attention_weights = promote_dtypes(value, sampling_locations, attention_weights)
    # Small (L, 2) and (L,) tensors; moving them is cheap and saves callers a device mismatch.
    spatial_shapes, level_start_index = (
        tensor if tensor.dtype == torch.int64 and tensor.device == value.device
        else tensor.to(device=value.device, dtype=torch.int64)
        for tensor in (spatial_shapes, level_start_index)
    )
    return value, spatial_shapes, level_start_index, sampling_locations, attention_weights


def common_dtype(value, sampling_locations, attention_weights) -> torch.dtype:
    """The dtype the op computes and returns in: the promotion of the three floating inputs'."""
    return torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)


def promote_dtypes(value, sampling_locations, attention_weights):
    """The three floating inputs in their ``common_dtype`` (those already in it unchanged)."""
    dtype = common_dtype(value, sampling_locations, attention_weights)
    return tuple(tensor if tensor.dtype == dtype else tensor.to(dtype)
                 for tensor in (value, sampling_locations, attention_weights))


def value_tokens_message(value_tokens, level_tokens) -> str:
    """The message of a value whose S is not sum_l H_l * W_l (the C++ check words it the same)."""
    return (
        f"ms_deform_attn: value has S = {value_tokens} tokens (dim 1) but spatial_shapes covers "
        f"sum_l H_l * W_l = {level_tokens}; value must hold exactly the flattened levels of spatial_shapes"
    )


def check_value_tokens(value, level_tokens: int) -> None:
    """Raises ValueError unless value (N, S, M, D) has S = ``level_tokens`` = sum_l H_l * W_l.

    A longer value would be computed silently (its extra tokens never read), a shorter one
    would fail deep inside an implementation; both are a caller's mistake. A symbolic S
    (a dynamic-shape trace) becomes a runtime assertion of the graph instead of a guard.
    """
    tokens = value.shape[1]
    if isinstance(tokens, int):
        if tokens != level_tokens:
            raise ValueError(value_tokens_message(tokens, level_tokens))
    else:
        torch._check_value(tokens == level_tokens, lambda: value_tokens_message(tokens, level_tokens))


def _is_concrete(tensor) -> bool:
    """Whether ``tensor``'s values can be read: a plain tensor in eager mode, not a fake,
    functional or meta tensor of a trace (there the compiled kernel checks at run time),
    nor a GPU tensor during CUDA graph capture."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(tensor) is not torch.Tensor or tensor.device.type == "meta":
        return False
    # reading a GPU tensor while a CUDA graph is being captured is an error
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


# (weak reference to a GPU spatial_shapes tensor, its version counter, its token count).
_last_read = None


def _token_count(spatial_shapes) -> int:
    """sum_l H_l * W_l of (L, 2) ``spatial_shapes``, read on the host.

    Reading a GPU tensor waits for the GPU; a model passes the same tensor to every layer,
    so the count of the last one read is kept (while that tensor lives and is unmodified)
    and a forward pass waits once rather than once per layer.
    """
    global _last_read
    gpu = spatial_shapes.device.type != "cpu"
    if gpu:
        last = _last_read
        if last is not None and last[0]() is spatial_shapes and last[1] == spatial_shapes._version:
            return last[2]
    count = sum(int(height) * int(width) for height, width in spatial_shapes.tolist())
    if gpu:
        _last_read = (weakref.ref(spatial_shapes), spatial_shapes._version, count)
    return count
