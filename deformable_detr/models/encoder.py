"""The deformable encoder: every pixel of every level attends to a few points on all levels.

Legend: N batch, S = sum_l H_l * W_l tokens, C channels, L levels.
"""
import copy
from typing import Sequence, Tuple

import torch
from torch import nn

from .deformable_attention import MSDeformAttn
from .dropout import Dropout, feed_forward_hidden


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then a ReLU feed-forward network."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        """src, pos (N, S, C); reference_points (N, S, L, 2); padding_mask (N, S) -> (N, S, C)."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(feed_forward_hidden(self.linear1, self.dropout2, src))
        return self.norm2(src + self.dropout3(src2))


class DeformableEncoder(nn.Module):
    """A stack of identical encoder layers (deep copies of ``layer``)."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def reference_points(level_shapes: Sequence[Tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Centres of the unpadded pixels of every level, seen from every level.

        Args:
            level_shapes: (H_l, W_l) per level as Python ints (symbolic sizes under ``torch.export``);
                an (L, 2) tensor is read on the host.
            valid_ratios: (N, L, 2) unpadded fraction (w, h) of each level.
        Returns:
            (N, S, L, 2) (x, y) in [0, 1] of the padded maps.
        """
        if isinstance(level_shapes, torch.Tensor):
            level_shapes = level_shapes.tolist()
        device = valid_ratios.device
        points = []
        for level, (h, w) in enumerate(level_shapes):
            # pixel centres 0.5, 1.5, ..., h - 0.5: exact in float32, the same numbers as
            # linspace(0.5, h - 0.5, h), but sized by h alone so that it traces with a symbolic h
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            # normalize by the unpadded extent of this level, in [0, 1] of the valid image ...
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        points = torch.cat(points, 1)
        # ... then map into each level's padded coordinates
        return points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask=None, level_shapes=None):
        """src, pos (N, S, C); spatial_shapes (L, 2); valid_ratios (N, L, 2); padding_mask (N, S) -> memory (N, S, C).

        ``level_shapes``, the (H_l, W_l) of ``spatial_shapes`` as Python (or symbolic) ints, spares
        reading the tensor on the host, which ``torch.export`` cannot trace.
        """
        reference_points = self.reference_points(spatial_shapes if level_shapes is None else level_shapes, valid_ratios)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output
