"""Recording where multi-scale deformable attention samples, as the model runs.

Legend: N batch, Lq queries, M heads, L levels, P points per head and level.

    with record_sampling(model) as records:
        outputs = model(images, masks)
    records[-1].layer                # "decoder.layers.5"
    records[-1].sampling_locations   # (N, Lq, M, L, P, 2): what the op received

Each ``MSDeformAttn`` checks one attribute, ``recording``: None (the default) costs nothing;
a list receives one ``SamplingRecord`` per call, made from the very tensors handed to the op,
so it holds what the model used whichever op implementation (CUDA, CPU kernel, reference) ran.
"""
import contextlib
import dataclasses
from typing import Iterator, List, Optional

import torch
from torch import nn


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
        ratios = []
        for (h, w), start in zip(self.spatial_shapes.tolist(), self.level_start_index.tolist()):
            mask = self.padding_mask[:, start : start + h * w].view(n, h, w)
            valid_h = torch.sum(~mask[:, :, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :], 1)
            ratios.append(torch.stack([valid_w.float() / w, valid_h.float() / h], -1))
        return torch.stack(ratios, 1)


def layer_name(module_name: str) -> str:
    """``transformer.decoder.layers.5.cross_attn`` -> ``decoder.layers.5``."""
    parts = module_name.split(".")
    for start, part in enumerate(parts):
        if part in ("encoder", "decoder") and parts[start + 1 : start + 2] == ["layers"] and len(parts) > start + 2:
            return ".".join(parts[start : start + 3])
    return module_name


@contextlib.contextmanager
def record_sampling(model: nn.Module) -> Iterator[List[SamplingRecord]]:
    """Within the block, every ``MSDeformAttn`` of ``model`` appends a ``SamplingRecord`` per call to the
    list yielded, in call order (encoder layers, then decoder layers). Recording stops on exit, even on an error."""
    from .deformable_attention import MSDeformAttn  # deformable_attention imports this module

    records: List[SamplingRecord] = []
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MSDeformAttn)]
    for name, module in modules:
        module.recording = records
        module.recording_name = layer_name(name)
    try:
        yield records
    finally:
        for _, module in modules:
            module.recording = None
