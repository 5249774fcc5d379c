"""Do two sets of detections agree? The check of an exported model against the PyTorch one.

Legend: N batch, Q queries, K classes, k detections kept per image.
"""
import dataclasses
from typing import List

import torch
from torchvision.ops import box_iou

from ..utils.box_ops import box_cxcywh_to_xyxy


@dataclasses.dataclass
class Detections:
    """One image's top-k detections: ``scores`` (k,) sigmoid scores, ``labels`` (k,) class indices,
    ``boxes`` (k, 4) xyxy in normalized image coordinates."""

    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor


@dataclasses.dataclass
class DetectionMatch:
    """How many reference detections a candidate set reproduces."""

    matched: int
    total: int

    @property
    def fraction(self) -> float:
        return self.matched / self.total if self.total else 1.0


def top_detections(logits: torch.Tensor, boxes: torch.Tensor, k: int = 100) -> List[Detections]:
    """The top-k (query, class) pairs per image by sigmoid score, as ``PostProcess`` selects them.

    Args:
        logits: (N, Q, K) before the sigmoid; boxes: (N, Q, 4) (cx, cy, w, h) in [0, 1].
    """
    n, q, num_classes = logits.shape
    scores, index = torch.topk(logits.float().sigmoid().reshape(n, -1), min(k, q * num_classes), dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    xyxy = torch.gather(box_cxcywh_to_xyxy(boxes.float()), 1, query.unsqueeze(-1).expand(-1, -1, 4))
    return [Detections(s, i % num_classes, b) for s, i, b in zip(scores, index, xyxy)]


def match_detections(
    reference: List[Detections], candidate: List[Detections], min_iou: float = 0.99, score_tolerance: float = 1e-3
) -> DetectionMatch:
    """Counts the reference detections that have a candidate on the same image with the same class,
    box IoU >= ``min_iou`` and score within ``score_tolerance``; each candidate matches at most
    one reference detection (greedily, in the reference's score order)."""
    if len(reference) != len(candidate):
        raise ValueError(f"reference has {len(reference)} images but candidate {len(candidate)}")
    matched = total = 0
    for ref, cand in zip(reference, candidate):
        total += len(ref.scores)
        if len(ref.scores) == 0 or len(cand.scores) == 0:
            continue
        # (k_ref, k_cand) which pairs agree
        agree = (
            (ref.labels[:, None] == cand.labels[None, :])
            & ((ref.scores[:, None] - cand.scores[None, :]).abs() <= score_tolerance)
            & (box_iou(ref.boxes, cand.boxes) >= min_iou)
        )
        used = torch.zeros(len(cand.scores), dtype=torch.bool)
        for row in torch.argsort(ref.scores, descending=True).tolist():
            free = agree[row] & ~used
            if free.any():
                used[int(torch.nonzero(free)[0])] = True
                matched += 1
    return DetectionMatch(matched, total)
