"""ResumableSampler: per-rank shards, resumption inside an epoch, argument checks."""

from __future__ import annotations

import pytest

from data.sampler import ResumableSampler, sample_seed


def shard(n, world_size, rank, batch_size, drop_last=True, epoch=0, skip_batches=0):
    sampler = ResumableSampler(n, batch_size=batch_size, seed=3, rank=rank, world_size=world_size,
                               drop_last=drop_last)
    sampler.set_epoch(epoch, skip_batches=skip_batches)
    return list(sampler)


@pytest.mark.parametrize("n", [5, 7, 12, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_shards_with_drop_last_are_disjoint_and_in_step(n, world_size, batch_size):
    shards = [[index for index, _ in shard(n, world_size, rank, batch_size)] for rank in range(world_size)]
    flat = [index for part in shards for index in part]
    # No sample on two ranks (its augmentation seed would repeat it exactly within one step) ...
    assert len(flat) == len(set(flat))
    # ... every rank takes the same number of whole batches, and only the remainder is left out.
    per_rank = (n // world_size) // batch_size * batch_size
    assert all(len(part) == per_rank for part in shards)


def test_without_drop_last_the_order_is_padded_to_cover_every_sample():
    shards = [[index for index, _ in shard(5, 2, rank, 1, drop_last=False)] for rank in range(2)]
    assert [len(part) for part in shards] == [3, 3]
    assert set(shards[0]) | set(shards[1]) == set(range(5))


def test_skip_batches_gives_the_rest_of_the_epoch_with_the_same_seeds():
    whole = shard(13, 2, 1, 2, epoch=4)
    assert shard(13, 2, 1, 2, epoch=4, skip_batches=2) == whole[4:]
    assert all(seed == sample_seed(3, 4, index) for index, seed in whole)


@pytest.mark.parametrize("options", [{"rank": 2, "world_size": 2}, {"rank": -1}, {"batch_size": 0},
                                     {"world_size": 0}])
def test_bad_arguments_are_refused(options):
    arguments = {"batch_size": 2, "rank": 0, "world_size": 1, **options}
    with pytest.raises(ValueError, match="batch_size >= 1 and 0 <= rank < world_size"):
        ResumableSampler(10, **arguments)
    with pytest.raises(ValueError, match="skip_batches must be >= 0"):
        ResumableSampler(10, batch_size=2).set_epoch(0, skip_batches=-1)
