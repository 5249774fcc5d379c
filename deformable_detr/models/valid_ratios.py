"""How much of each padded feature map an image covers: the valid ratios that scale reference points.

Images sit in the top-left corner of their padded batch (padding on the right and at the bottom),
so an image's valid height at a level is the number of unpadded rows of the mask's first column,
and its valid width the number of unpadded columns of its first row.
"""
from typing import Sequence, Tuple

import torch


def valid_sizes(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) padding mask (True on padding) -> valid height and width, each (N,) int64."""
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return valid_h, valid_w


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) padding mask of one level -> (N, 2) float32 unpadded fraction (w, h)."""
    _, h, w = mask.shape
    valid_h, valid_w = valid_sizes(mask)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def valid_ratios(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """L padding masks (N, H_l, W_l) -> (N, L, 2) float32 unpadded fraction (w, h) of each level."""
    return torch.stack([valid_ratio(mask) for mask in masks], 1)
