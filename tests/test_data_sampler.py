import math

import pytest
from torch.utils.data import DistributedSampler

from deformable_detr.data.sampler import ShardedSampler


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("size", [0, 1, 2, 5, 10, 11])
@pytest.mark.parametrize("shuffle", [False, True])
def test_evaluation_sharding_covers_every_index_once(num_replicas, size, shuffle):
    seen = []
    for rank in range(num_replicas):
        sampler = ShardedSampler(size, num_replicas=num_replicas, rank=rank, shuffle=shuffle, pad=False)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        seen += indices
    assert sorted(seen) == list(range(size))


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("size", [1, 2, 5, 10, 11])
def test_training_sharding_gives_equal_counts_and_covers_everything(num_replicas, size):
    shards = [list(ShardedSampler(size, num_replicas=num_replicas, rank=rank, seed=4)) for rank in range(num_replicas)]
    assert {len(shard) for shard in shards} == {math.ceil(size / num_replicas)}
    assert set().union(*map(set, shards)) == set(range(size))


@pytest.mark.parametrize("num_replicas, rank", [(1, 0), (2, 1), (3, 2)])
@pytest.mark.parametrize("epoch", [0, 3])
def test_matches_torch_distributed_sampler(num_replicas, rank, epoch):
    dataset = list(range(13))
    reference = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=9)
    reference.set_epoch(epoch)
    sampler = ShardedSampler(len(dataset), num_replicas=num_replicas, rank=rank, shuffle=True, seed=9)
    sampler.set_epoch(epoch)
    assert list(sampler) == list(reference)


def test_epochs_reshuffle_identically_on_all_ranks():
    first = [ShardedSampler(20, num_replicas=2, rank=r, seed=1) for r in range(2)]
    for sampler in first:
        sampler.set_epoch(1)
    again = [ShardedSampler(20, num_replicas=2, rank=r, seed=1) for r in range(2)]
    for sampler in again:
        sampler.set_epoch(1)
    assert [list(s) for s in first] == [list(s) for s in again]
    epoch_two = ShardedSampler(20, num_replicas=2, rank=0, seed=1)
    epoch_two.set_epoch(2)
    assert list(epoch_two) != list(first[0])


@pytest.mark.parametrize("pad", [True, False])
def test_set_start_resumes_exactly(pad):
    uninterrupted = ShardedSampler(23, num_replicas=3, rank=1, seed=2, pad=pad)
    uninterrupted.set_epoch(5)
    full = list(uninterrupted)
    for start in range(len(full) + 1):
        resumed = ShardedSampler(23, num_replicas=3, rank=1, seed=2, pad=pad)
        resumed.set_epoch(5, start=start)
        assert list(resumed) == full[start:]
        assert len(resumed) == len(full) - start
    # A separate set_start on the current epoch behaves the same; the next epoch starts at 0.
    resumed = ShardedSampler(23, num_replicas=3, rank=1, seed=2, pad=pad)
    resumed.set_epoch(5)
    resumed.set_start(4)
    assert list(resumed) == full[4:]
    resumed.set_epoch(6)
    assert len(list(resumed)) == len(full)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ShardedSampler(10, num_replicas=2, rank=2)
    sampler = ShardedSampler(10, num_replicas=2, rank=0)
    with pytest.raises(ValueError):
        sampler.set_start(6)
