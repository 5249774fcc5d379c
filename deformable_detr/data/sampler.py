"""Rank-sharded, epoch-seeded, resumable sampling of dataset indices."""
from __future__ import annotations

import math
from typing import Iterator, List, Optional

import torch
from torch.utils.data import Sampler

from deformable_detr.utils.distributed import get_rank, get_world_size

__all__ = ["ShardedSampler"]


class ShardedSampler(Sampler[int]):
    """Indices of this rank's share of a dataset of ``dataset_size`` items.

    Each epoch the indices are permuted with a generator seeded by ``seed + epoch``
    (identically on every rank; in order when ``shuffle`` is off) and dealt round-robin:
    rank r gets positions r, r + R, r + 2R, ... for R = ``num_replicas``.

    - ``pad=True`` (training): the permutation is extended by repeating its beginning up to a
      multiple of R, so every rank yields ``ceil(N / R)`` indices (some twice per epoch).
    - ``pad=False`` (evaluation): no repeats; ranks get ``ceil`` or ``floor`` of N / R indices
      and every index appears on exactly one rank.

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
    ):
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for {num_replicas} replicas")
        if dataset_size < 0:
            raise ValueError(f"dataset_size must be >= 0, got {dataset_size}")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.pad = pad
        self.seed = seed
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
        if self.pad and order:
            total = math.ceil(self.dataset_size / self.num_replicas) * self.num_replicas
            repeats = math.ceil(total / len(order))
            order = (order * repeats)[:total]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return self.epoch_length() - self.start
