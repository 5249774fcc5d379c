import math
import random

import pytest
from torch.utils.data import DistributedSampler

from deformable_detr.data.sampler import ShardedSampler, group_by_size


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


def _random_sizes(count, seed=0):
    rng = random.Random(seed)
    return [(rng.randint(60, 200), rng.randint(60, 200)) for _ in range(count)]


def _padded_area(batch, sizes):
    return len(batch) * max(sizes[i][0] for i in batch) * max(sizes[i][1] for i in batch)


def test_group_by_size_sorts_each_window_and_keeps_the_items():
    sizes = _random_sizes(50)
    order = list(range(50))
    random.Random(1).shuffle(order)
    grouped = group_by_size(order, sizes, 16)
    for begin in range(0, 50, 16):
        window = grouped[begin : begin + 16]
        assert sorted(window) == sorted(order[begin : begin + 16])  # no item leaves its window
        keys = [(sizes[i][0] > sizes[i][1], sizes[i][0] * sizes[i][1]) for i in window]
        assert keys == sorted(keys)
    assert group_by_size(order, sizes, 1) == order and group_by_size(order, sizes, 0) == order


def test_grouped_batches_pad_less():
    sizes = _random_sizes(512)
    plain = ShardedSampler(512, seed=3)
    grouped = ShardedSampler(512, seed=3, sizes=lambda epoch: sizes, group_window=64)
    for sampler in (plain, grouped):
        sampler.set_epoch(2)
    padded = [sum(_padded_area(o[k : k + 4], sizes) for k in range(0, 512, 4)) for o in (list(plain), list(grouped))]
    assert sorted(plain) == sorted(grouped)
    assert padded[1] < 0.85 * padded[0]


def test_grouping_uses_the_sizes_of_the_epoch():
    calls = []

    def sizes(epoch):
        calls.append(epoch)
        return _random_sizes(40, seed=epoch)

    sampler = ShardedSampler(40, seed=0, sizes=sizes, group_window=8)
    sampler.set_epoch(4)
    first = list(sampler)
    assert calls == [4]
    order = ShardedSampler(40, seed=0)
    order.set_epoch(4)
    assert first == group_by_size(list(order), _random_sizes(40, seed=4), 8)
    # unknown sizes: the plain order
    assert list(ShardedSampler(40, seed=0, sizes=lambda epoch: None, group_window=8)) == list(ShardedSampler(40, seed=0))
    with pytest.raises(ValueError, match="sizes gives 39 items for a dataset of 40"):
        list(ShardedSampler(40, sizes=lambda epoch: _random_sizes(39), group_window=8))


@pytest.mark.parametrize("layout", [(1, 6), (2, 3), (3, 2), (6, 1)])
def test_grouped_images_seen_do_not_depend_on_the_layout(layout):
    """After k steps of R processes x batch B the images seen are the first k * B * R positions
    of one grouped order, whatever R and B: a run can resume mid-epoch under another layout."""
    num_replicas, batch = layout
    sizes = _random_sizes(60, seed=5)

    def shards(start=0):
        samplers = [ShardedSampler(60, num_replicas=num_replicas, rank=r, seed=2, sizes=lambda e: sizes, group_window=16)
                    for r in range(num_replicas)]
        for sampler in samplers:
            sampler.set_epoch(1, start=start)
        return [list(sampler) for sampler in samplers]

    reference = shards()[0] if num_replicas == 1 else None
    single = ShardedSampler(60, seed=2, sizes=lambda e: sizes, group_window=16)
    single.set_epoch(1)
    order = list(single)
    full = shards()
    for steps in range(0, 60 // (batch * num_replicas) + 1):
        seen = [i for shard in full for i in shard[: steps * batch]]
        assert sorted(seen) == sorted(order[: steps * batch * num_replicas])
        resumed = shards(start=steps * batch)
        assert resumed == [shard[steps * batch :] for shard in full]
    if reference is not None:
        assert reference == order
