"""Which classifier logit is which category.

COCO's layout, which the official checkpoints have, makes the logit index the category id: 91
logits for ids 1..90 (the unused ids keep their logits). That wastes nothing for ids close to
0..K, but a dataset with ids {3, 17, 1042} would get a 1043-logit head. Such sparse or large ids
get one logit per category instead, in id order. Targets carry logit indices
(``logits_of``); predictions are turned back into category ids (``ids_of``), so files, metrics
and the API always speak the dataset's own ids.
"""
import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class CategoryLayout:
    """``num_logits`` logits; ``logit_ids`` the category id of each logit (ascending), or None when
    the logit index is the category id (COCO's layout)."""

    num_logits: int
    logit_ids: Optional[Tuple[int, ...]] = None

    @classmethod
    def for_category_ids(cls, category_ids: Iterable[int], num_classes: Optional[int] = None) -> "CategoryLayout":
        """The layout of a dataset with ``category_ids``: ids as logit indices (largest id + 1 logits)
        when that costs at most twice the categories (or 16 more), else one logit per category in
        id order. ``num_classes`` given (``dataset.num_classes``): ids as indices, that many logits."""
        ids = sorted({int(i) for i in category_ids})
        if num_classes is not None:
            return cls(int(num_classes))
        if not ids:
            return cls(1)
        if ids[0] < 0:
            raise ValueError(f"category ids must be non-negative, got {ids[0]}")
        if ids[-1] + 1 <= max(2 * len(ids), len(ids) + 16):
            return cls(ids[-1] + 1)
        return cls(len(ids), tuple(ids))

    @property
    def by_id(self) -> bool:
        """Whether the logit index is the category id."""
        return self.logit_ids is None

    def logit_index(self, category_id: int) -> Optional[int]:
        """The logit of ``category_id`` (None when the head has none for it)."""
        if self.logit_ids is None:
            return int(category_id) if 0 <= int(category_id) < self.num_logits else None
        try:
            return self.logit_ids.index(int(category_id))
        except ValueError:
            return None

    def logit_indices(self, category_ids: Iterable[int]) -> List[int]:
        """The logits of those ``category_ids`` the head has, in the order given."""
        indices = (self.logit_index(i) for i in category_ids)
        return [i for i in indices if i is not None]

    def logits_of(self, labels: torch.Tensor) -> torch.Tensor:
        """Category ids (n,) int64 -> logit indices (n,); an id the head lacks is a ValueError."""
        if self.logit_ids is None:
            return labels
        # logit_ids are sorted: a binary search finds each id's logit
        table = torch.tensor(self.logit_ids, dtype=torch.int64, device=labels.device)
        indices = torch.searchsorted(table, labels).clamp(max=len(table) - 1)
        found = table[indices] == labels
        if not bool(found.all()):
            missing = sorted(set(labels[~found].tolist()))
            raise ValueError(f"category ids {missing} have no logit; the head's categories are {list(self.logit_ids)}")
        return indices

    def ids_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Logit indices (n,) int64 -> category ids (n,)."""
        if self.logit_ids is None:
            return indices
        return torch.tensor(self.logit_ids, dtype=torch.int64, device=indices.device)[indices]

    def to_dict(self) -> Dict[str, Any]:
        """Plain types for a checkpoint."""
        return {"num_logits": self.num_logits, "logit_ids": list(self.logit_ids) if self.logit_ids is not None else None}

    @classmethod
    def from_dict(cls, data: Optional[Mapping[str, Any]], num_classes: int) -> "CategoryLayout":
        """A checkpoint's layout; files without one (older ones, official releases) are by id."""
        if not data or data.get("logit_ids") is None:
            return cls(int(num_classes))
        return cls(int(data["num_logits"]), tuple(int(i) for i in data["logit_ids"]))

    def categories_by_logit(self, categories: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """``categories`` [{id, name}] with their logit index added, in logit order (those the head has)."""
        rows = [dict(c, logit=self.logit_index(c["id"])) for c in categories]
        return sorted((r for r in rows if r["logit"] is not None), key=lambda r: r["logit"])
