"""ONNX translation of ``torch.ops.deformable_attention.ms_deform_attn_forward`` (and of its Triton
twin, ``ms_deform_attn_triton_forward``, which has the same signature) for
``torch.onnx.export(..., dynamo=True, custom_translation_table=TRANSLATION_TABLE)``.

The op becomes standard ONNX (opset 18): per level a ``Slice`` of the value, a ``GridSample``
(bilinear, zero padding, align_corners=0, as ``reference.py``) and a weighted ``ReduceSum``,
so the exported model runs in any ONNX runtime without this project's library. Batch, image
size (hence S and every H_l, W_l) and the number of queries stay dynamic: the level sizes are
read from the ``spatial_shapes`` and ``level_start_index`` inputs at run time. Heads, channels,
levels and points are fixed by the model and read from the traced shapes.

Importing needs ``onnxscript`` (an export-time dependency only: nothing else in the package imports this module).

Legend: N batch, S value tokens, M heads, D channels per head, Lq queries, L levels, P points.
"""
import torch
from onnxscript import opset18 as op

OPSET = 18


def _static(dim, what: str) -> int:
    if not isinstance(dim, int):
        raise ValueError(f"ms_deform_attn ONNX translation: the {what} must be a fixed size, got {dim}")
    return dim


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Builds the ONNX graph of the op; the arguments are the exporter's symbolic tensors.

    Args:
        value: (N, S, M, D); spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1]; attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M * D)
    """
    heads = _static(value.shape[2], "number of heads")
    channels = _static(value.shape[3], "channels per head")
    levels = _static(sampling_locations.shape[3], "number of levels")
    points = _static(sampling_locations.shape[4], "number of points")
    queries = op.Shape(sampling_locations, start=1, end=2)  # (1,) Lq, dynamic
    # GridSample wants coordinates in [-1, 1]
    grids = op.Sub(op.Mul(sampling_locations, op.CastLike(2.0, sampling_locations)), op.CastLike(1.0, sampling_locations))
    # (N, Lq, M, L, P, 2) -> (N, M, Lq, L, P, 2)
    grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])
    grid_shape = op.Concat(op.Constant(value_ints=[-1]), queries, op.Constant(value_ints=[points, 2]), axis=0)
    sampled = []
    for level in range(levels):
        index = op.Constant(value_ints=[level])
        size = op.Reshape(op.Gather(spatial_shapes, index, axis=0), op.Constant(value_ints=[2]))  # (2,) H_l, W_l
        start = op.Gather(level_start_index, index, axis=0)  # (1,)
        end = op.Add(start, op.ReduceProd(size, keepdims=1))
        # N, H*W, M, D -> N, M, D, H*W -> N*M, D, H, W
        value_l = op.Slice(value, start, end, op.Constant(value_ints=[1]))
        value_l = op.Transpose(value_l, perm=[0, 2, 3, 1])
        value_l = op.Reshape(value_l, op.Concat(op.Constant(value_ints=[-1, channels]), size, axis=0))
        # N, M, Lq, P, 2 -> N*M, Lq, P, 2
        grid_l = op.Reshape(op.Gather(grids, index, axis=3), grid_shape)
        # N*M, D, Lq, P
        sample = op.GridSample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=0)
        sampled.append(op.Unsqueeze(sample, op.Constant(value_ints=[3])))
    # N*M, D, Lq, L, P -> N*M, D, Lq, L*P
    stacked = op.Reshape(op.Concat(*sampled, axis=3), op.Constant(value_ints=[0, 0, 0, -1]))
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
    weights = op.Reshape(weights, op.Constant(value_ints=[-1, 1, 0, levels * points]))
    # N*M, D, Lq -> N, M*D, Lq -> N, Lq, M*D
    output = op.ReduceSum(op.Mul(stacked, weights), op.Constant(value_ints=[-1]), keepdims=0)
    output = op.Reshape(output, op.Constant(value_ints=[-1, heads * channels, 0]))
    return op.Transpose(output, perm=[0, 2, 1])


def translation_table() -> dict:
    """{op overload: translation} for ``torch.onnx.export(custom_translation_table=...)``: the compiled
    and the Triton forward, those of them that are defined (the compiled library is loaded; Triton
    can run)."""
    namespace = torch.ops.deformable_attention
    names = ("ms_deform_attn_forward", "ms_deform_attn_triton_forward")
    return {getattr(namespace, name).default: ms_deform_attn_forward for name in names if hasattr(namespace, name)}
