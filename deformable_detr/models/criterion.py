"""The set prediction loss: Hungarian matching, then focal class loss, L1 and GIoU box losses.

Legend: B batch, Q queries, K classes, T targets.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import distributed as dist
from ..utils.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of (B, Q, K) logits against (B, Q, K) one-hot targets,
    summed over images, queries and classes and divided by ``num_boxes``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


class SetCriterion(nn.Module):
    """Losses of the matched predictions of the last decoder layer, every auxiliary layer and,
    in two-stage mode, the encoder proposals (matched class-agnostically).

    Args:
        num_classes: K.
        matcher: the ``HungarianMatcher``.
        weight_dict: loss name -> weight (suffixes ``_0``.. for auxiliary layers, ``_enc`` for proposals);
            see ``loss_weights``.
        focal_alpha, focal_gamma: of the focal class loss.

    ``forward`` returns every loss unweighted plus the logged metrics ``class_error`` and
    ``cardinality_error``; ``total_loss`` weights and sums them.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float], focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def loss_labels(self, outputs, targets, indices, num_boxes, log: bool = True) -> Dict[str, torch.Tensor]:
        """Sigmoid focal loss; every unmatched query is a negative for all classes."""
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"the model predicts {logits.shape[-1]} classes but the criterion expects {self.num_classes}")
        batch_idx, query_idx = _prediction_index(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, matched_labels] = 1
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)
        losses = {"loss_ce": loss}
        if log:
            with torch.no_grad():
                if matched_labels.numel():
                    correct = logits[batch_idx, query_idx].argmax(-1) == matched_labels
                    losses["class_error"] = 100.0 - 100.0 * correct.float().mean()
                else:
                    losses["class_error"] = logits.new_zeros(())
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets) -> Dict[str, torch.Tensor]:
        """|predicted objects - target objects| per image, averaged; a prediction counts when its best
        class has probability > 0.5. Logged, not optimized."""
        logits = outputs["pred_logits"]
        predicted = (logits.sigmoid().amax(-1) > 0.5).sum(1).float()
        expected = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, expected)}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        """L1 on (cx, cy, w, h) and 1 - GIoU of the matched boxes, summed and divided by ``num_boxes``."""
        batch_idx, query_idx = _prediction_index(indices)
        src = outputs["pred_boxes"][batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(src.dtype)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        if len(src):
            giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src.float()), box_cxcywh_to_xyxy(tgt.float())))
            loss_giou = (1 - giou).sum() / num_boxes
        else:
            loss_giou = src.sum() * 0.0  # keeps the graph connected when no image has a target
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _losses(self, outputs, targets, num_boxes, suffix: str, log: bool) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        indices = [(i.to(outputs["pred_logits"].device), j.to(outputs["pred_logits"].device)) for i, j in indices]
        losses = {}
        losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=log))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        if log:
            losses.update(self.loss_cardinality(outputs, targets))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]], num_boxes: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: the detector's output dict (``pred_logits``, ``pred_boxes``, optional
                ``aux_outputs`` and ``enc_outputs``).
            targets: per image ``labels`` (T,) and ``boxes`` (T, 4) cxcywh in [0, 1].
            num_boxes: the loss normalizer (0-d); default ``normalizer(targets)``. Gradient
                accumulation passes the normalizer of all its micro-batches.
        Returns:
            unweighted losses and logged metrics by name.
        """
        if num_boxes is None:
            num_boxes = self.normalizer(targets, outputs["pred_logits"].device)

        losses = self._losses(outputs, targets, num_boxes, "", log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses(aux, targets, num_boxes, f"_{i}", log=False))
        if "enc_outputs" in outputs:
            # proposals are class-agnostic: every target is class 0
            binary = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            losses.update(self._losses(outputs["enc_outputs"], binary, num_boxes, "_enc", log=False))
        return losses

    @staticmethod
    def normalizer(targets: List[Dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """The mean number of target boxes per rank (at least 1), as a 0-d tensor on ``device``;
        kept a tensor so no host sync is needed. ``targets`` may span several micro-batches."""
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.get_world_size() > 1:
            torch.distributed.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        return torch.clamp(num_boxes, min=1.0)[0]

    def total_loss(self, losses: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the losses that have a weight."""
        return sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)


def loss_weights(
    cls: float = 2.0, bbox: float = 5.0, giou: float = 2.0, num_decoder_layers: int = 6, aux_loss: bool = True, two_stage: bool = False
) -> Dict[str, float]:
    """The weight of every loss term: the last layer's, each auxiliary layer's and the proposals'."""
    base = {"loss_ce": cls, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(base)
    if aux_loss:
        for i in range(num_decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if two_stage:
        weights.update({f"{k}_enc": v for k, v in base.items()})
    return weights


def _prediction_index(indices):
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx
