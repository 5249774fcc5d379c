"""The multi-scale deformable attention module around the ``ops.ms_deform_attn`` op.

Legend: N batch, Lq queries, S = sum_l H_l * W_l value tokens, C channels, M heads, L levels,
P sampling points per head and level.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deformable_detr_ops import ms_deform_attn

from .sampling_record import SamplingRecord


class MSDeformAttn(nn.Module):
    """Each query attends to P points per head and level around its reference point.

    The sampling offsets and the attention weights are linear functions of the query; the
    sampled values come from a linear projection of the flattened feature maps.

    Args:
        d_model: C.
        n_levels: L.
        n_heads: M, dividing C.
        n_points: P.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # set by ``record_sampling``: a list that receives each call's SamplingRecord (None: off, free)
        self.recording: Optional[list] = None
        self.recording_name = ""
        self.reset_parameters()

    def reset_parameters(self):
        """Offsets start on a circle of directions, one per head, the k-th point k steps out; uniform weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        # scale so the larger of |cos|, |sin| is 1: directions land on the square's border
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C), with position embedding added.
            reference_points: (N, Lq, L, 2) points (x, y) in [0, 1] of the padded image, or
                (N, Lq, L, 4) boxes (cx, cy, w, h) whose size scales the offsets.
            value: (N, S, C) flattened feature maps of all levels.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64 start of each level in S.
            padding_mask: (N, S) bool, True on padding (those values are zeroed).
        Returns:
            (N, Lq, C)
        """
        N, Lq, _ = query.shape
        S = value.shape[1]
        value = self.value_proj(value)
        if padding_mask is not None:
            # not in place: the projection's (N, S, C) output is a view of its 2-D product, and an
            # in-place fill of a view makes autograd copy the gradient through CopySlices and
            # AsStrided, a cost per call (docs/benchmarks.md, Design measurements)
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, self.d_model // self.n_heads)
        weights = self.attention_weights(query).view(N, Lq, self.n_heads, self.n_levels * self.n_points)
        # in float32 (or float64) even under autocast, as CUDA autocast does for every softmax: the
        # op computes in the promoted dtype anyway, and PyTorch's CPU softmax backward over 16-wide
        # rows is slower in bfloat16 than in float32 (docs/benchmarks.md, Design measurements)
        weights = F.softmax(weights, -1, dtype=torch.promote_types(weights.dtype, torch.float32))
        weights = weights.view(N, Lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            locations = self.point_locations(query, reference_points, spatial_shapes)
        elif reference_points.shape[-1] == 4:
            # offsets are in units of half the reference box, shared out over the points
            offsets = self.sampling_offsets(query).view(N, Lq, self.n_heads, self.n_levels, self.n_points, 2)
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got shape {tuple(reference_points.shape)}")
        if self.recording is not None:
            self.recording.append(
                SamplingRecord(
                    self.recording_name, locations.detach(), weights.detach(), spatial_shapes, level_start_index,
                    reference_points.detach(), None if padding_mask is None else padding_mask.detach(),
                )
            )
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)

    def point_locations(
        self, query: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """Sampling locations around points: reference + offsets / (W_l, H_l), offsets in pixels of each level.

        Computed as one matrix product,
            [query, reference] @ [W / n ; E]^T + b / n,
        where W, b are ``sampling_offsets``' weight and bias, n is each output's W_l or H_l, and
        E (M*L*P*2, L*2) is 0/1 and adds reference point (l, x|y) to the outputs of level l.
        The same function as ``reference[:, :, None, :, None] + sampling_offsets(query) / n`` up
        to float rounding, without the three broadcasting passes over the (N, Lq, M, L, P, 2)
        result (the division, its backward, the addition), which cost more than the matrix
        product's forward and backward (docs/benchmarks.md, Design measurements). In float32
        (float64 if the inputs are) even under autocast: the reference points need it.

        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) points (x, y) in [0, 1].
            spatial_shapes: (L, 2) int64 (H_l, W_l).
        Returns:
            (N, Lq, M, L, P, 2)
        """
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        # at least float32, whatever autocast made of the query
        dtype = torch.promote_types(torch.promote_types(query.dtype, reference_points.dtype), torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            inverse = 1.0 / spatial_shapes.flip(-1).to(dtype)  # (L, 2): 1 / (W_l, H_l)
            scale = inverse[None, :, None, :].expand(M, L, P, 2).reshape(-1)
            selector = torch.eye(2 * L, dtype=dtype, device=query.device).view(1, L, 1, 2, 2 * L)
            selector = selector.expand(M, L, P, 2, 2 * L).reshape(M * L * P * 2, 2 * L)
            weight = torch.cat([self.sampling_offsets.weight.to(dtype) * scale[:, None], selector], 1)
            inputs = torch.cat([query.to(dtype), reference_points.reshape(N, Lq, 2 * L).to(dtype)], -1)
            locations = F.linear(inputs, weight, self.sampling_offsets.bias.to(dtype) * scale)
        return locations.view(N, Lq, M, L, P, 2)
