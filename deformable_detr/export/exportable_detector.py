"""The detector as exported: an unpadded image batch in, the final layer's logits and boxes out.

Legend: N batch, Q queries, K classes.
"""
from typing import Tuple

import torch
from torch import nn

from ..models.detector import DeformableDETR


class ExportableDetector(nn.Module):
    """Wraps a ``DeformableDETR`` for ``torch.export`` and ONNX.

    All images of a batch have the same size, so there is no padding: the mask is all False and
    the results equal the detector's on each image alone. Auxiliary and encoder outputs are
    dropped (and so traced away).
    """

    def __init__(self, detector: DeformableDETR):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            images: (N, 3, H, W) float32, resized and normalized as at evaluation, unpadded.
        Returns:
            ``logits`` (N, Q, K) before the sigmoid, ``boxes`` (N, Q, 4) (cx, cy, w, h) in [0, 1].
        """
        n, _, h, w = images.shape
        mask = torch.zeros((n, h, w), dtype=torch.bool, device=images.device)
        outputs = self.detector(images, mask)
        return outputs["pred_logits"], outputs["pred_boxes"]
