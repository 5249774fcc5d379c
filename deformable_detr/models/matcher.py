"""Hungarian matching of predictions to ground-truth boxes.

Legend: B batch, Q queries, K classes, T targets of one image.
"""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimizing class_w * focal class cost + bbox_w * L1 + giou_w * (-GIoU).

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs.
        focal_alpha, focal_gamma: of the focal-style class cost.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("the matcher needs at least one non-zero cost weight")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrices(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """(B, Q, Tmax) costs, computed for all images at once on the outputs' device.

        Targets are padded to the largest count in the batch; columns beyond an image's own T are junk.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q = logits.shape[:2]
        t_max = max((len(t["labels"]) for t in targets), default=0)
        if t_max == 0:
            return logits.new_zeros((b, q, 0), dtype=torch.float32)
        labels = logits.new_zeros((b, t_max), dtype=torch.long)
        tgt_boxes = boxes.new_zeros((b, t_max, 4))
        tgt_boxes[..., 2:] = 1.0  # valid dummy boxes keep GIoU finite in padded columns
        for i, t in enumerate(targets):
            labels[i, : len(t["labels"])] = t["labels"]
            tgt_boxes[i, : len(t["labels"])] = t["boxes"].to(boxes.dtype)

        prob = logits.float().sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        index = labels[:, None, :].expand(-1, prob.shape[1], -1)
        cost_class = torch.gather(pos_cost, 2, index) - torch.gather(neg_cost, 2, index)
        boxes = boxes.float()
        tgt_boxes = tgt_boxes.float()
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        # batched (B, Q, T): the same arithmetic as one image at a time, in a few dozen operations instead of B times as many
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) cxcywh.
            targets: per image ``labels`` (T,) and ``boxes`` (T, 4) cxcywh.
        Returns:
            per image (query indices, target indices), int64 on the CPU, min(Q, T) long each.
        """
        # a diverged model gives NaN costs, which the solver rejects: match anyway and let the
        # (then non-finite) loss tell the training loop to skip the step
        costs = self.cost_matrices(outputs, targets).nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8).cpu()
        indices = []
        for i, t in enumerate(targets):
            rows, cols = linear_sum_assignment(costs[i, :, : len(t["labels"])].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
