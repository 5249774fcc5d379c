"""FLOPs of one detector forward, by part, with ``torch.utils.flop_counter``.

Counts follow the counter's convention: a multiply-add is 2 FLOPs (matrix products, convolutions,
attention); element-wise operations, normalization and softmax are not counted. Multi-scale
deformable attention counts 5 multiply-adds per sampled channel whichever implementation runs
(see ``deformable_detr_ops.flops``). Halving a count gives multiply-adds (MACs), the unit of
most detection papers' "FLOPs" (Deformable DETR's 173 G among them).
"""
from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deformable_detr_ops.flops import FORWARD_NAMES


@dataclass
class FlopCount:
    """FLOPs of one call: ``total``, ``by_part`` (a partition of the total) and
    ``deformable_attention`` (the op's share, inside the encoder and decoder parts)."""

    total: int
    by_part: Dict[str, int] = field(default_factory=dict)
    deformable_attention: int = 0

    @property
    def macs(self) -> float:
        return self.total / 2


def _module_total(counts: Dict[str, Dict], name: str) -> int:
    return int(sum(counts.get(name, {}).values()))


def count_detector_flops(model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> FlopCount:
    """FLOPs of ``model(images, masks)`` without gradients, split into backbone, input
    projections, encoder, decoder, the rest of the transformer (two-stage proposals, query
    references) and the rest (position encodings, prediction heads outside the decoder).

    Args:
        model: a ``DeformableDETR`` (any module with ``backbone``, ``input_proj`` and
            ``transformer.encoder`` / ``transformer.decoder`` children).
        images: (B, 3, H, W); masks: (B, H, W) bool, True on padding.
    """
    # The counter's module tracking hooks every input that requires a gradient, which fails for
    # parameters passed as inputs (the query embeddings) under no_grad: freeze them meanwhile.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images, masks)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = _module_total(counts, "Global")
    parts = {
        "backbone": _module_total(counts, f"{root}.backbone"),
        # the projections are called one by one, never their ModuleList
        "input_projections": sum(
            _module_total(counts, name) for name in counts if name.startswith(f"{root}.input_proj.") and name.count(".") == 2
        ),
        "encoder": _module_total(counts, f"{root}.transformer.encoder"),
        "decoder": _module_total(counts, f"{root}.transformer.decoder"),
    }
    parts["transformer_other"] = _module_total(counts, f"{root}.transformer") - parts["encoder"] - parts["decoder"]
    parts["other"] = total - sum(parts.values())
    op = sum(int(flops) for operator, flops in counts.get("Global", {}).items() if str(operator) in FORWARD_NAMES)
    return FlopCount(total=total, by_part=parts, deformable_attention=op)
