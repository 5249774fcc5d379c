"""Pure-PyTorch reference of multi-scale deformable attention.

Legend: N batch, S = sum_l H_l * W_l value tokens, M heads, D channels per head,
Lq queries, L levels, P sampling points per level and head.
"""
import torch
import torch.nn.functional as F

from .validation import check_value_tokens

# On the CPU, half types are computed in float32: more accurate than
# accumulating in half, and independent of grid_sample's CPU dtype support.
_CPU_NATIVE_DTYPES = (torch.float32, torch.float64)


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Bilinear sampling with ``grid_sample`` (align_corners=False, zero padding), then a weighted sum.

    Differentiable through autograd; reads ``spatial_shapes`` on the host, so it
    synchronizes with the GPU and breaks ``torch.compile`` graphs.

    A sample whose location has a NaN or infinite coordinate contributes nothing and gets
    zero gradients (location and weight), as in the compiled kernels; grid_sample alone
    would spread NaN through the output and every gradient. With no levels (L = 0) the
    output is zeros that still depend on the inputs, so backward gives zero gradients.

    Args:
        value: (N, S, M, D)
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level
        level_start_index: (L,) int64, offset of each level in S (unused here; levels are split by shape)
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1], (x, y); samples outside read zeros
        attention_weights: (N, Lq, M, L, P)
    Returns:
        (N, Lq, M * D) in the dtype of value
    Raises:
        ValueError: S differs from sum_l H_l * W_l.
    """
    if value.device.type == "cpu" and value.dtype not in _CPU_NATIVE_DTYPES:
        output = ms_deform_attn_reference(
            value.float(), spatial_shapes, level_start_index, sampling_locations.float(), attention_weights.float()
        )
        return output.to(value.dtype)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    check_value_tokens(value, sum(h * w for h, w in shapes))
    if not shapes:
        # Sums of empty slices: zeros with a grad_fn (zero gradients), never NaN even for inf inputs.
        anchor = sum(t.flatten()[:0].sum() for t in (value, sampling_locations, attention_weights))
        return value.new_zeros(N, Lq, M * D) + anchor
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # A non-finite (x, y) would make grid_sample return NaN (and NaN gradients): move such samples
    # far outside every level instead, where they read zeros; torch.where passes them no gradient.
    finite = torch.isfinite(sampling_locations).all(-1, keepdim=True)
    sampling_locations = torch.where(finite, sampling_locations, -2.0)
    # grid_sample wants coordinates in [-1, 1]
    sampling_grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # N, H*W, M, D -> N, H*W, M*D -> N, M*D, H*W -> N*M, D, H, W
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # N, Lq, M, P, 2 -> N, M, Lq, P, 2 -> N*M, Lq, P, 2
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # N*M, D, Lq, P
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N, M, Lq, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    # N*M, D, Lq, L, P -> N*M, D, Lq, L*P -> N*M, D, Lq -> N, M*D, Lq
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return output.transpose(1, 2).contiguous()
