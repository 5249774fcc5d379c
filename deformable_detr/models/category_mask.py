"""Keeping predictions to the dataset's categories: class logits of other ids can never win the top-k."""
from typing import Iterable

import torch


def keep_categories(logits: torch.Tensor, category_ids: Iterable[int]) -> torch.Tensor:
    """(..., K) class logits with every class index that is not in ``category_ids`` set to -inf.

    The official COCO models have 91 logits for 80 categories (ids 0, 12, 26, ... are unused); their
    sigmoid scores can still be high, so an unmasked top-k over all logits can return ids the dataset has not.
    """
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    ids = [i for i in category_ids if 0 <= int(i) < logits.shape[-1]]
    keep[torch.as_tensor(ids, dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))
