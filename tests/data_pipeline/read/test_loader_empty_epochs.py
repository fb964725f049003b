"""An epoch that gives a rank no batch is a one-line DataError saying why, raised at
once; in resampled mode (endless) a long run of draws with no usable sample is."""

import pytest

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.transforms import ImageConfig
from tests.data_pipeline.fake_shards import write_shards


def _loader(spec, **kw) -> ShardLoader:
    config = dict(shards=spec, captions=False, batch_size=16, num_workers=0, drop_last=True,
                  image=ImageConfig(size=16))  # fmt: skip
    return ShardLoader(LoaderConfig(**{**config, **kw}))


def _error(loader) -> str:
    with pytest.raises(DataError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("num_workers,usable", [(0, "[10]"), (2, "[5, 5]")])
def test_too_few_samples_for_a_batch_says_so(tmp_path, num_workers, usable):
    write_shards(tmp_path, 10, per_shard=10)
    loader = _loader(tmp_path, num_workers=num_workers)
    message = _error(loader)
    assert "epoch 0 gave rank 0 of 1 no batch: too few usable samples for a batch" in message
    assert f"usable samples per worker: {usable}; batch_size 16, drop_last=True" in message
    assert loader.epoch == 0  # and the error comes again, not an empty epoch 1
    assert "too few usable samples" in _error(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_set_of_unreadable_shards_says_so(tmp_path, num_workers):
    (tmp_path / "00000.tar").write_bytes(b"")
    message = _error(_loader(tmp_path, num_workers=num_workers))
    assert "every one of its 1 shards is unreadable or empty" in message
    assert f"skipped: bad_shard {max(1, num_workers)}" in message  # each worker read it


def test_samples_that_are_all_unusable_say_so(tmp_path):
    write_shards(tmp_path, 6, per_shard=3, corrupt=frozenset(range(6)))
    message = _error(_loader(tmp_path, drop_last=False))
    assert "none of the 6 samples it read is usable (skipped: corrupt_image 6)" in message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_unreadable_shards_end_in_an_error_not_a_loop(tmp_path, num_workers):
    (tmp_path / "00000.tar").write_bytes(b"")
    (tmp_path / "00001.tar").write_bytes(b"not a tar")
    message = _error(_loader(tmp_path, num_workers=num_workers, resampled=True))
    assert "resampled shards: worker" in message
    assert "100 shards in a row gave no sample (skips since its last batch: bad_shard 100)" in (
        message
    )


def test_resampled_unusable_samples_end_in_an_error_not_a_loop(tmp_path):
    # shuffle_block mixes many draws' samples: the streak is counted in draws.
    write_shards(tmp_path, 6, per_shard=2, corrupt=frozenset(range(6)))
    loader = _loader(tmp_path, resampled=True, shuffle_block=50, drop_last=False)
    assert "100 shards in a row gave no usable sample" in _error(loader)


def test_resampled_good_data_with_big_shuffle_blocks_is_not_mistaken_for_dry(tmp_path):
    # 1-sample shards, a block of 300 draws (over the limit of 100), a third corrupt.
    write_shards(tmp_path, 30, per_shard=1, corrupt=frozenset(range(0, 30, 3)))
    loader = _loader(tmp_path, resampled=True, shuffle_block=300, batch_size=30)
    batches = iter(loader)
    assert sum(len(next(batches)) for _ in range(20)) == 600


def test_an_epoch_resumed_at_its_very_end_is_no_error(shards):
    loader = _loader(shards, batch_size=8, num_workers=2)
    iterator = iter(loader)
    for _ in range(len(list(_loader(shards, batch_size=8, num_workers=2)))):
        next(iterator)  # every batch of epoch 0, the loader not yet told it ended
    state = loader.state_dict()
    del iterator
    resumed = _loader(shards, batch_size=8, num_workers=2)
    resumed.load_state_dict(state)
    assert list(resumed) == []  # nothing left of epoch 0
    assert resumed.epoch == 1 and len(list(resumed)) > 0


def test_fewer_samples_than_ranks_x_workers_says_so(tmp_path):
    write_shards(tmp_path, 2, per_shard=2)
    loader = ShardLoader(LoaderConfig(shards=tmp_path, captions=False, batch_size=1,
                                      num_workers=2, image=ImageConfig(size=16)),
                         rank=1, world_size=2)  # fmt: skip
    message = _error(loader)  # its slots, 2 and 3 of 4, keep samples 2, 3, 6, ...: none
    assert "epoch 0 gave rank 1 of 2 no batch: its 1 shards hold no sample for it" in message
    assert "fewer samples than 2 ranks x 2 workers" in message
