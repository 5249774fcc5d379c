"""Model outputs -> scored, labelled boxes in original image pixels."""
from typing import Dict, List

import torch
from torch import nn

from ..utils.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-k (query, class) pairs by sigmoid score, as COCO evaluation expects.

    Args:
        num_select: k (100 for COCO: at most 100 detections per image).
    """

    def __init__(self, num_select: int = 100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], target_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) cxcywh in [0, 1].
            target_sizes: (B, 2) (h, w) to scale to: the original image size for evaluation.
        Returns:
            per image ``scores`` (k,), ``labels`` (k,) class indices (= category ids),
            ``boxes`` (k, 4) xyxy in pixels.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be (B={len(logits)}, 2), got {tuple(target_sizes.shape)}")
        b, q, k = logits.shape
        prob = logits.sigmoid()
        scores, index = torch.topk(prob.view(b, -1), min(self.num_select, q * k), dim=1)
        query = torch.div(index, k, rounding_mode="floor")
        labels = index % k
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": x} for s, lab, x in zip(scores, labels, boxes)]
