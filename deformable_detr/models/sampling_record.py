"""What one multi-scale deformable attention call sampled (see sampling_recorder.py, which collects them).

Legend: N batch, Lq queries, M heads, L levels, P points per head and level, S value tokens.
"""
import dataclasses
from typing import Optional

import torch

from .valid_ratios import valid_ratios


@dataclasses.dataclass
class SamplingRecord:
    """One deformable attention call, detached.

    Attributes:
        layer: ``encoder.layers.i`` or ``decoder.layers.i`` (else the module's own name).
        sampling_locations: (N, Lq, M, L, P, 2) (x, y) in [0, 1] of each padded level map.
        attention_weights: (N, Lq, M, L, P), summing to 1 over (L, P) per head.
        spatial_shapes: (L, 2) int64 (H_l, W_l).
        level_start_index: (L,) int64 start of each level in the flattened value.
        reference_points: (N, Lq, L, 2) points or (N, Lq, L, 4) boxes, in each level's padded coordinates
            (the model has scaled them by the valid ratios).
        padding_mask: (N, S) bool, True on padding, or None (nothing padded).
    """

    layer: str
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    reference_points: torch.Tensor
    padding_mask: Optional[torch.Tensor]

    def valid_ratios(self) -> torch.Tensor:
        """(N, L, 2) unpadded fraction (w, h) of each level, computed from the padding mask as the transformer does."""
        n, levels = self.sampling_locations.shape[0], self.spatial_shapes.shape[0]
        if self.padding_mask is None:
            return torch.ones(n, levels, 2, device=self.sampling_locations.device)
        masks = [
            self.padding_mask[:, start : start + h * w].view(n, h, w)
            for (h, w), start in zip(self.spatial_shapes.tolist(), self.level_start_index.tolist())
        ]
        return valid_ratios(masks)
