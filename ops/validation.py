"""Argument checks of ``ms_deform_attn``: shapes, dtypes and devices only, so no
host-device synchronization and nothing that breaks a ``torch.compile`` graph.

Legend: N batch, S value tokens, M heads, D channels per head, Lq queries,
L levels, P sampling points per level and head.
"""
import torch

_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def _shape(tensor):
    return tuple(tensor.shape)


def prepare_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Checks the arguments and aligns their dtypes and devices.

    Raises ValueError naming the offending argument. Returns the five tensors with
    value, sampling_locations and attention_weights in one floating dtype (the
    promotion of theirs: mixing float16 value with float32 locations, as autocast
    does, computes in float32), and spatial_shapes / level_start_index as int64
    on value's device.
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

    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    value, sampling_locations, attention_weights = (
        tensor if tensor.dtype == dtype else tensor.to(dtype)
        for tensor in (value, sampling_locations, attention_weights)
    )
    # Small (L, 2) and (L,) tensors; moving them is cheap and saves callers a device mismatch.
    spatial_shapes, level_start_index = (
        tensor if tensor.dtype == torch.int64 and tensor.device == value.device
        else tensor.to(device=value.device, dtype=torch.int64)
        for tensor in (spatial_shapes, level_start_index)
    )
    return value, spatial_shapes, level_start_index, sampling_locations, attention_weights
