"""Reused batch buffers: a worker writes a new batch into a buffer only once every tensor,
view and array of the batch made there before is gone; pooled batches travel as the
buffer's number; nothing the consumer holds is ever overwritten."""

import gc
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.read import loader as loader_module
from megabatch.data_pipeline.read.batch_buffers import BatchLayout, BatchPools
from megabatch.data_pipeline.read.loader import Batch, LoaderConfig, ShardLoader, _pooled_batch
from megabatch.data_pipeline.read.shard_stream import block_shuffled
from megabatch.data_pipeline.read.transforms import ImageConfig
from tests.data_pipeline.fake_shards import READER_SAMPLES

N = READER_SAMPLES  # conftest.py's shard set


def _config(shards, **kw):
    defaults = dict(shards=shards, batch_size=8, num_workers=1, seed=5, shuffle_block=16,
                    prefetch_factor=2, image=ImageConfig(size=16))  # fmt: skip
    return LoaderConfig(**{**defaults, **kw})


def _copy(batch):
    return batch.keys, batch.images.clone(), batch.tokens.clone(), batch.token_mask.clone()


# --------------------------------------------------------------------------- the pool
def test_layout_puts_each_array_apart_in_one_storage():
    layout = BatchLayout(batch_size=3, size=5, context_length=7)
    views = layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8))
    assert views.images.shape == (3, 5, 5, 3) and views.images.dtype == torch.uint8
    assert views.tokens.shape == (3, 7) and views.tokens.dtype == torch.int64
    assert views.mask.shape == (3, 7) and views.mask.dtype == torch.bool
    storage = views.images.untyped_storage()
    assert views.tokens.untyped_storage() is storage and views.mask.untyped_storage() is storage
    views.images.fill_(255)
    views.tokens.fill_(-1)
    assert not views.mask.any()  # no array spills into the next
    assert layout.tokens_at % 64 == 0 and layout.mask_at % 64 == 0
    assert BatchLayout(3, 5, 0).views(torch.zeros(225, dtype=torch.uint8)).tokens is None


def test_a_buffer_comes_back_only_when_every_view_of_its_batch_is_gone():
    pools = BatchPools(workers=1, capacity=2, layout=BatchLayout(2, 4, 3), shared=False)
    index, _ = pools.take(0)
    assert index == 0
    pools.lend(0, 0)
    views = pools.views(0, 0)
    pools.release_on_free(views.images, 0, 0)
    assert pools.take(0)[0] == 1  # buffer 0 is out
    token_view, array = views.tokens[:1], views.images.numpy()
    del views
    gc.collect()
    assert pools.take(0)[0] == 1  # a view and an array of the batch are still alive
    del token_view
    gc.collect()
    assert pools.take(0)[0] == 1
    del array
    gc.collect()
    assert pools.take(0)[0] == 0  # now free again


def test_a_full_pool_hands_out_one_off_buffers():
    pools = BatchPools(workers=2, capacity=2, layout=BatchLayout(2, 4, 0), shared=False)
    pools.lend(1, 0)
    pools.lend(1, 1)
    index, buffer = pools.take(1)
    assert index == -1 and buffer.numel() == pools.layout.nbytes
    assert all(b.data_ptr() != buffer.data_ptr() for b in pools.buffers[1])
    assert pools.take(0)[0] == 0  # another worker's pool is its own


# --------------------------------------------------------------------------- the loader
def test_dropped_batches_give_their_buffers_back(shards, tokenizer):
    for workers in (0, 1):
        leases = [
            b.lease for b in ShardLoader(_config(shards, num_workers=workers), tokenizer=tokenizer)
        ]
        assert len(leases) == N // 8 and None not in leases
        # The consumer lets each batch go: a few buffers serve the whole epoch.
        assert len({index for _, _, index in leases}) <= 4


def test_held_batches_are_never_overwritten(shards, tokenizer):
    for workers in (0, 1, 2):
        config = _config(shards, num_workers=workers)
        reference = [_copy(b) for b in ShardLoader(config, tokenizer=tokenizer)]
        held = {}
        for i, batch in enumerate(ShardLoader(config, tokenizer=tokenizer)):
            keys, images, tokens, mask = reference[i]
            assert batch.keys == keys and torch.equal(batch.images, images)
            assert torch.equal(batch.tokens, tokens) and torch.equal(batch.token_mask, mask)
            # Keep some batches whole, some as one view or one array, drop the rest.
            if i % 4 == 0:
                held[i] = ("batch", batch)
            elif i % 4 == 1:
                held[i] = ("image view", batch.images[-1:])
            elif i % 4 == 2:
                held[i] = ("token array", batch.tokens.numpy())
            del batch
        for i, (kind, value) in held.items():
            _, images, tokens, mask = reference[i]
            if kind == "batch":
                assert torch.equal(value.images, images) and torch.equal(value.tokens, tokens)
            elif kind == "image view":
                assert torch.equal(value, images[-1:])
            else:
                assert np.array_equal(value, tokens.numpy())


def test_a_batch_held_into_the_next_epoch_stays_intact(shards, tokenizer):
    loader = ShardLoader(_config(shards), tokenizer=tokenizer)
    *_, last = loader
    kept = _copy(last)
    for _ in loader:  # the next epoch: new workers, new buffers
        pass
    assert last.keys == kept[0] and torch.equal(last.images, kept[1])
    assert torch.equal(last.tokens, kept[2])


def test_pooled_batches_travel_as_the_buffers_number(shards, tokenizer, monkeypatch):
    config = _config(shards, num_workers=1)
    iterator = iter(ShardLoader(config, tokenizer=tokenizer))
    first = next(iterator)
    # From the worker: not a shared-memory segment of its own, a view of the pool's memory.
    assert first.lease is not None and not first.images.is_shared()
    del iterator

    iterator = iter(ShardLoader(_config(shards, num_workers=0), tokenizer=tokenizer))
    batch = next(iterator)  # (the live iterator keeps the epoch's pools)
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: object())  # "in a worker"
    in_worker = bytes(ForkingPickler.dumps(batch))
    assert b"_pooled_batch" in in_worker and b"torch" not in in_worker  # no tensor at all
    monkeypatch.undo()
    received = pickle.loads(in_worker)
    assert received.images.data_ptr() == batch.images.data_ptr()  # the same memory
    assert received.images.untyped_storage() is not batch.images.untyped_storage()
    assert received.keys == batch.keys and torch.equal(received.tokens, batch.tokens)
    # Outside a worker (a user's pickle) the tensors travel as usual, data included.
    assert len(pickle.dumps(batch)) > batch.images.numel()
    assert b"_pooled_batch" not in bytes(ForkingPickler.dumps(batch))


def test_a_batch_whose_pools_are_gone_is_an_error():
    values = {"keys": [], "meta": [], "worker": 0, "position": 0, "epoch": 0, "skipped": {},
              "lease": (-1, 0, 0)}  # fmt: skip
    with pytest.raises(DataError, match="after its loader's epoch"):
        _pooled_batch(0, values)
    assert isinstance(
        pickle.loads(pickle.dumps(Batch(torch.zeros(1), None, None, **values))), Batch
    )


def test_no_shuffle_draws_no_permutation(monkeypatch):
    def fail(*args):
        raise AssertionError("block_permutation called")

    monkeypatch.setattr("megabatch.data_pipeline.read.shard_stream.block_permutation", fail)
    assert list(block_shuffled(iter(range(5)), 1, 3, 0, (0, 0, 0))) == [0, 1, 2, 3, 4]
