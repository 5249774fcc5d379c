"""Rank-sharded, epoch-seeded, resumable sampling of dataset indices."""
from __future__ import annotations

import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Sampler

from deformable_detr.utils.distributed import get_rank, get_world_size

__all__ = ["ShardedSampler", "group_by_size"]

Sizes = Sequence[Tuple[int, int]]


def group_by_size(order: Sequence[int], sizes: Sizes, window: int) -> List[int]:
    """``order`` with each run of ``window`` consecutive positions sorted by the items' sizes.

    ``sizes[i]`` is item i's (h, w). The sort key is (portrait, area): consecutive items then
    have similar shapes, so a batch of them needs less padding, while which items share a
    window (and so a batch) stays as random as ``order``. The sort is stable, so the result is
    a pure function of its arguments.
    """
    if window < 2:
        return list(order)

    def key(index: int) -> Tuple[bool, int]:
        height, width = sizes[index]
        return height > width, height * width

    grouped: List[int] = []
    for begin in range(0, len(order), window):
        grouped.extend(sorted(order[begin : begin + window], key=key))
    return grouped


class ShardedSampler(Sampler[int]):
    """Indices of this rank's share of a dataset of ``dataset_size`` items.

    Each epoch the indices are permuted with a generator seeded by ``seed + epoch``
    (identically on every rank; in order when ``shuffle`` is off) and dealt round-robin:
    rank r gets positions r, r + R, r + 2R, ... for R = ``num_replicas``.

    - ``pad=True`` (training): the permutation is extended by repeating its beginning up to a
      multiple of R, so every rank yields ``ceil(N / R)`` indices (some twice per epoch).
    - ``pad=False`` (evaluation): no repeats; ranks get ``ceil`` or ``floor`` of N / R indices
      and every index appears on exactly one rank.

    ``group_window`` > 1 with ``sizes`` (a function of the epoch giving every item's (h, w)
    as it will be loaded, e.g. ``CocoDetection.output_sizes``, or ``None`` for unknown):
    before dealing, every run of ``group_window`` consecutive positions of the permutation is
    sorted by size (``group_by_size``), so the items of a batch have similar shapes and pad
    less. The window is a number of positions of the whole permutation, not of a rank's
    share or a batch, so the images seen after k steps are still its first k * batch * R
    positions for any batch size and R (which lets a run resume under another layout).

    ``set_start(k)`` skips this rank's first ``k`` indices of the current epoch, which lets a
    run resumed after ``k`` samples continue with exactly the indices an uninterrupted run
    would have used next. ``set_epoch`` starts the new epoch from position 0 unless given
    ``start``. ``len()`` counts the indices still to come in this epoch.
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        shuffle: bool = True,
        pad: bool = True,
        seed: int = 0,
        sizes: Optional[Callable[[int], Optional[Sizes]]] = None,
        group_window: int = 0,
    ):
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for {num_replicas} replicas")
        if dataset_size < 0:
            raise ValueError(f"dataset_size must be >= 0, got {dataset_size}")
        if group_window < 0:
            raise ValueError(f"group_window must be >= 0, got {group_window}")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.pad = pad
        self.seed = seed
        self.sizes = sizes
        self.group_window = group_window
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Switch to ``epoch`` (new permutation) and begin at this rank's position ``start``."""
        self.epoch = epoch
        self.set_start(start)

    def set_start(self, start: int) -> None:
        """Skip this rank's first ``start`` indices of the current epoch."""
        if not 0 <= start <= self.epoch_length():
            raise ValueError(f"start {start} outside 0..{self.epoch_length()} for rank {self.rank}")
        self.start = start

    def epoch_length(self) -> int:
        """Indices this rank yields in a full epoch (ignoring ``start``)."""
        if self.pad:
            return math.ceil(self.dataset_size / self.num_replicas)
        return len(range(self.rank, self.dataset_size, self.num_replicas))

    def indices(self) -> List[int]:
        """This rank's full index list for the current epoch (ignoring ``start``)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.group_window > 1 and self.sizes is not None:
            sizes = self.sizes(self.epoch)
            if sizes is not None:
                if len(sizes) != self.dataset_size:
                    raise ValueError(f"sizes gives {len(sizes)} items for a dataset of {self.dataset_size}")
                order = group_by_size(order, sizes, self.group_window)
        if self.pad and order:
            total = math.ceil(self.dataset_size / self.num_replicas) * self.num_replicas
            repeats = math.ceil(total / len(order))
            order = (order * repeats)[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.epoch_length() - self.start
