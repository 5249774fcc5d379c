"""Batching of variable-size images into one zero-padded tensor plus a padding mask."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["pad_images", "collate"]

Target = Dict[str, torch.Tensor]


def pad_images(images: Sequence[torch.Tensor], multiple: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """List of (C, H_i, W_i) tensors -> images (B, C, H, W), mask (B, H, W) bool.

    Each image sits at the top-left corner; padding (bottom and right) is zero in the
    images and True in the mask. H and W are the batch maxima, rounded up to a multiple of
    ``multiple`` (1 or 0: not rounded).
    """
    if not images:
        raise ValueError("pad_images needs at least one image")
    if any(image.dim() != 3 for image in images):
        raise ValueError("pad_images expects (C, H, W) tensors")
    if multiple < 0:
        raise ValueError(f"pad_images: multiple must be >= 0, got {multiple}")
    channels = max(image.shape[0] for image in images)
    height = round_up(max(image.shape[1] for image in images), multiple)
    width = round_up(max(image.shape[2] for image in images), multiple)
    first = images[0]
    batch = torch.zeros((len(images), channels, height, width), dtype=first.dtype, device=first.device)
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for image, padded, padded_mask in zip(images, batch, mask):
        c, h, w = image.shape
        padded[:c, :h, :w].copy_(image)
        padded_mask[:h, :w] = False
    return batch, mask


def collate(batch: Sequence[Optional[Tuple[torch.Tensor, Target]]], pad_multiple: int = 1) -> Tuple[torch.Tensor, torch.Tensor, List[Target]]:
    """DataLoader ``collate_fn``: items (image (3, H, W), target) -> (images, masks, targets),
    padded as ``pad_images`` pads (to ``pad_multiple``; bind it with ``functools.partial``).

    ``None`` items (images skipped as unreadable) are dropped, so a batch may be smaller
    than requested. A batch with no usable item gives images (0, 3, 0, 0), masks (0, 0, 0)
    and an empty target list; callers should skip it.
    """
    items = [item for item in batch if item is not None]
    if not items:
        return torch.zeros((0, 3, 0, 0)), torch.zeros((0, 0, 0), dtype=torch.bool), []
    images, masks = pad_images([image for image, _ in items], pad_multiple)
    return images, masks, [target for _, target in items]


def round_up(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple`` (0 or 1: unchanged)."""
    return -(-size // multiple) * multiple if multiple > 1 else size
