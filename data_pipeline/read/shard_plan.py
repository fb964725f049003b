"""Which shards, and which of their samples, each (rank, worker) reads: deterministic
in (seed, epoch), so every process can work out its share alone and a resumed run
re-derives exactly the stream it left.

Epoch mode (each sample once per epoch):
- the shard list is permuted with a generator seeded by (seed, epoch);
- with at least as many shards as slots (ranks x workers), slot k reads shards
  k, k + slots, k + 2 slots, ... of the permutation, every sample of each;
- with fewer shards than slots, every slot reads every shard of the permutation and
  keeps the samples whose running index i satisfies i % slots == k. Each sample is still
  read by exactly one slot, no worker sits idle and nothing hangs; the cost is that every
  worker reads every shard, which is fine for the small data sets where this happens.

Resampled mode (very large corpora): an endless stream of shards drawn with replacement,
per slot from a generator seeded by (seed, slot); each source is drawn with probability
proportional to its weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    """One worker process of one rank: the unit that reads a share of the data."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class Share:
    """A slot's part of one source for one epoch: read ``shards`` in order and keep the
    samples whose running index i (over those shards) has i % stride == offset."""

    shards: tuple[int, ...]  # indices into the source's shard list
    stride: int = 1
    offset: int = 0


def _generator(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def epoch_share(num_shards: int, seed: int, epoch: int, slot: Slot, source: int = 0) -> Share:
    order = _generator(seed, epoch, source).permutation(num_shards)
    if num_shards >= slot.count:
        return Share(tuple(int(i) for i in order[slot.index :: slot.count]))
    return Share(tuple(int(i) for i in order), stride=slot.count, offset=slot.index)


def resampled_shards(
    shards_per_source: Sequence[int], weights: Sequence[float], seed: int, slot: Slot
) -> Iterator[tuple[int, int]]:
    """Endless (source, shard index) draws with replacement."""
    rng = _generator(seed, 1_000_003, slot.index)  # a stream apart from epoch_share's
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    while True:
        source = int(rng.choice(len(p), p=p))
        yield source, int(rng.integers(shards_per_source[source]))


def mixing_order(weights: Sequence[float], seed: int, epoch: int, slot: Slot) -> Iterator[int]:
    """Endless source indices for interleaving several sources in epoch mode: the next
    sample comes from source i with probability proportional to weight i (a draw that
    lands on an exhausted source moves on to the next live one, cyclically)."""
    rng = _generator(seed, epoch, 2_000_003, slot.index)
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    while True:
        yield int(rng.choice(len(p), p=p))


def block_permutation(size: int, seed: int, epoch: int, slot_index: int, block: int) -> np.ndarray:
    """The order in which a slot emits block ``block`` of its stream (the shuffle)."""
    return _generator(seed, epoch, 3_000_017, slot_index, block).permutation(size)
