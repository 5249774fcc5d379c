"""Model outputs -> scored, labelled boxes in original image pixels."""
import logging
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ..utils.box_ops import box_cxcywh_to_xyxy

logger = logging.getLogger(__name__)


class PostProcess(nn.Module):
    """Top-k (query, class) pairs by sigmoid score, as COCO evaluation expects.

    The classifier has one logit per class index 0..K-1 (index = category id), but a dataset
    uses only some ids (COCO: 80 of 91). With ``restrict_to_dataset_categories`` and the
    dataset's ``category_ids`` known, the top-k runs over those ids only, so every prediction
    carries a category of the dataset and the k slots are not spent on ids it does not have.
    Without the restriction (or before any ids are given) the top-k runs over every logit,
    exactly as the official implementation does.

    Args:
        num_select: k (100 for COCO: at most 100 detections per image).
        restrict_to_dataset_categories: keep only ``category_ids`` (default); False for the
            official selection over every logit (bit-for-bit parity with the official code).
        category_ids: the dataset's category ids (e.g. ``sorted(coco.getCatIds())``); can also
            be given later with ``set_category_ids``.
        logit_ids: the category id of each logit when they are not the logit indices (a head of
            one logit per category, see ``utils.category_layout``); None: index = id.
    """

    def __init__(self, num_select: int = 100, restrict_to_dataset_categories: bool = True, category_ids: Optional[Iterable[int]] = None,
                 logit_ids: Optional[Iterable[int]] = None):
        super().__init__()
        self.num_select = num_select
        self.restrict_to_dataset_categories = restrict_to_dataset_categories
        self.category_ids: Optional[List[int]] = None
        self.logit_ids: Optional[List[int]] = [int(i) for i in logit_ids] if logit_ids is not None else None
        self._warned_unrestricted = False
        if category_ids is not None:
            self.set_category_ids(category_ids)

    def set_category_ids(self, category_ids: Iterable[int]) -> "PostProcess":
        """Use the dataset's category ids (any order, duplicates ignored) from now on; returns self."""
        ids = sorted({int(i) for i in category_ids})
        if not ids or ids[0] < 0:
            raise ValueError(f"category_ids must be non-negative category ids, at least one; got {ids}")
        self.category_ids = ids
        return self

    def extra_repr(self) -> str:
        restricted = f"{len(self.category_ids)} category ids" if self.category_ids is not None else "category ids not set"
        return f"num_select={self.num_select}, restrict_to_dataset_categories={self.restrict_to_dataset_categories} ({restricted})"

    def _allowed_classes(self, num_classes: int, device: torch.device) -> Optional[torch.Tensor]:
        """(C,) int64 class indices the top-k may choose from, or None for all K."""
        if not self.restrict_to_dataset_categories:
            return None
        if self.category_ids is None:
            if not self._warned_unrestricted:
                self._warned_unrestricted = True
                logger.warning(
                    "postprocess: no dataset category ids given, so predictions may carry ids that are no category of the dataset; "
                    "pass category_ids= to PostProcess (or set postprocess.restrict_to_dataset_categories=false to silence this)"
                )
            return None
        # ids the classifier has no logit for cannot be predicted (the caller warns about such a model)
        if self.logit_ids is None:
            columns = [i for i in self.category_ids if i < num_classes]
        else:
            wanted = set(self.category_ids)
            columns = [k for k, i in enumerate(self.logit_ids[:num_classes]) if i in wanted]
        return torch.tensor(columns, dtype=torch.int64, device=device)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], target_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) cxcywh in [0, 1].
            target_sizes: (B, 2) (h, w) to scale to: the original image size for evaluation.
        Returns:
            per image ``scores`` (k,), ``labels`` (k,) category ids (only the dataset's when
            restricted), ``boxes`` (k, 4) xyxy in pixels; k = min(num_select, Q * C)
            with C the classes chosen from (K, or the dataset's ids).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError(f"target_sizes must be (B={len(logits)}, 2), got {tuple(target_sizes.shape)}")
        b, q, k = logits.shape
        allowed = self._allowed_classes(k, logits.device)
        if allowed is not None:
            # (B, Q, K) -> (B, Q, C): the other logits are not candidates at all
            logits = logits.index_select(2, allowed)
        c = logits.shape[2]
        prob = logits.sigmoid()
        scores, index = torch.topk(prob.reshape(b, -1), min(self.num_select, q * c), dim=1)
        query = torch.div(index, c, rounding_mode="floor")
        labels = index % c
        if allowed is not None:
            labels = allowed[labels]
        if self.logit_ids is not None:
            labels = torch.tensor(self.logit_ids, dtype=torch.int64, device=labels.device)[labels]
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": x} for s, lab, x in zip(scores, labels, boxes)]
