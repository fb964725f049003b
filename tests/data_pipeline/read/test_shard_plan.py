"""Who reads what: every shard (or sample) once per epoch over all slots, deterministic in
(seed, epoch); resampled draws and source mixing by weight; block shuffle orders."""

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from megabatch.data_pipeline.read.shard_plan import (
    Share,
    Slot,
    block_permutation,
    epoch_share,
    mixing_order,
    resampled_shards,
)


def _slots(world_size: int, num_workers: int) -> list[Slot]:
    return [
        Slot(r, world_size, w, num_workers) for r in range(world_size) for w in range(num_workers)
    ]


def test_slots_number_ranks_times_workers_in_rank_order():
    slots = _slots(3, 2)
    assert [s.index for s in slots] == list(range(6))
    assert {s.count for s in slots} == {6}
    assert Slot(rank=2, world_size=3, worker=1, num_workers=2).index == 5


@pytest.mark.parametrize("num_shards", [6, 7, 13, 100])
@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 3), (3, 2)])
def test_each_shard_goes_to_exactly_one_slot(num_shards, world_size, num_workers):
    shares = [epoch_share(num_shards, 5, 2, slot) for slot in _slots(world_size, num_workers)]
    assert all((s.stride, s.offset) == (1, 0) for s in shares)  # whole shards each
    dealt = [shard for share in shares for shard in share.shards]
    assert sorted(dealt) == list(range(num_shards))
    sizes = [len(share.shards) for share in shares]
    assert max(sizes) - min(sizes) <= 1  # dealt round-robin


@pytest.mark.parametrize("num_shards", [1, 3, 5])
def test_fewer_shards_than_slots_split_the_samples_instead(num_shards):
    slots = _slots(2, 3)  # 6 slots
    shares = [epoch_share(num_shards, 5, 0, slot) for slot in slots]
    assert len({share.shards for share in shares}) == 1  # every slot reads every shard
    assert sorted(shares[0].shards) == list(range(num_shards))
    assert [(s.stride, s.offset) for s in shares] == [(6, k) for k in range(6)]
    # Each running sample index i is kept by exactly one slot: i % stride == offset.
    for i in range(50):
        assert sum(i % s.stride == s.offset for s in shares) == 1


def test_epoch_share_is_a_function_of_seed_epoch_and_source():
    slot = Slot(1, 2, 0, 2)
    share = epoch_share(40, 7, 3, slot)
    assert share == epoch_share(40, 7, 3, slot)  # a resumed run re-derives it
    assert isinstance(share, Share)
    others = [epoch_share(40, 8, 3, slot), epoch_share(40, 7, 4, slot),
              epoch_share(40, 7, 3, slot, source=1)]  # fmt: skip
    assert all(other.shards != share.shards for other in others)


def test_the_shard_order_is_a_permutation_reshuffled_each_epoch():
    slot = Slot(0, 1, 0, 1)  # one slot: its share is the whole permutation
    orders = [epoch_share(30, 0, epoch, slot).shards for epoch in range(4)]
    assert all(sorted(order) == list(range(30)) for order in orders)
    assert len(set(orders)) == 4


def test_resampled_draws_are_endless_in_range_and_weighted():
    slot = Slot(0, 1, 0, 2)
    draws = list(islice(resampled_shards([4, 10], [3.0, 1.0], 11, slot), 4000))
    assert all(0 <= shard < (4, 10)[source] for source, shard in draws)
    by_source = Counter(source for source, _ in draws)
    assert 0.70 < by_source[0] / len(draws) < 0.80  # 3:1
    assert Counter(shard for source, shard in draws if source == 0).keys() == {0, 1, 2, 3}


def test_resampled_draws_are_deterministic_per_seed_and_slot():
    def first(seed, slot, n=50):
        return list(islice(resampled_shards([20], [1.0], seed, slot), n))

    slot, other = Slot(0, 2, 1, 2), Slot(1, 2, 1, 2)
    assert first(3, slot) == first(3, slot)
    assert first(3, slot) != first(3, other)  # every slot draws its own stream
    assert first(3, slot) != first(4, slot)


def test_a_zero_weight_source_is_never_drawn():
    draws = islice(resampled_shards([5, 5], [1.0, 0.0], 0, Slot(0, 1, 0, 1)), 500)
    assert {source for source, _ in draws} == {0}
    choices = islice(mixing_order([0.0, 2.0], 0, 0, Slot(0, 1, 0, 1)), 500)
    assert set(choices) == {1}


def test_mixing_order_is_weighted_and_a_function_of_seed_epoch_and_slot():
    slot = Slot(0, 1, 0, 1)
    choices = list(islice(mixing_order([2.0, 1.0, 1.0], 9, 0, slot), 4000))
    counts = Counter(choices)
    assert set(counts) == {0, 1, 2}
    assert 0.45 < counts[0] / len(choices) < 0.55
    assert list(islice(mixing_order([2.0, 1.0, 1.0], 9, 0, slot), 200)) == choices[:200]
    again = list(islice(mixing_order([2.0, 1.0, 1.0], 9, 1, slot), 200))
    assert again != choices[:200]  # a new epoch mixes anew
    other = list(islice(mixing_order([2.0, 1.0, 1.0], 9, 0, Slot(0, 1, 0, 2)), 200))
    assert other == choices[:200]  # the same slot index: Slot(0, 1, 0, 2).index == 0
    other = list(islice(mixing_order([2.0, 1.0, 1.0], 9, 0, Slot(0, 1, 1, 2)), 200))
    assert other != choices[:200]


@pytest.mark.parametrize("size", [1, 2, 17, 1000])
def test_block_permutation_is_a_permutation(size):
    order = block_permutation(size, 1, 2, 3, 4)
    assert isinstance(order, np.ndarray)
    assert sorted(order.tolist()) == list(range(size))


def test_block_permutation_is_a_function_of_seed_epoch_slot_and_block():
    order = block_permutation(64, 1, 2, 3, 4)
    assert np.array_equal(order, block_permutation(64, 1, 2, 3, 4))
    for changed in [(2, 2, 3, 4), (1, 3, 3, 4), (1, 2, 4, 4), (1, 2, 3, 5)]:
        assert not np.array_equal(order, block_permutation(64, *changed))
