"""The shard reader: exactly-once epochs over ranks x workers, exact resume, bad data."""

import logging

import pytest
import torch

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.data_pipeline.read.transforms import ImageConfig
from tests.data_pipeline.fake_shards import READER_SAMPLES, write_shards

N = READER_SAMPLES  # conftest.py's shard set


def _config(shards, **kw):
    defaults = dict(shards=shards, batch_size=8, num_workers=2, seed=3, shuffle_block=16,
                    image=ImageConfig(size=16))  # fmt: skip
    return LoaderConfig(**{**defaults, **kw})


def _keys(batches):
    return [k.split("#")[1] for b in batches for k in b.keys]


@pytest.mark.parametrize("per_shard", [13, 50], ids=["10 shards", "3 shards < 4 slots"])
def test_each_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path, tokenizer, per_shard):
    write_shards(tmp_path, N, per_shard=per_shard)
    seen = []
    for rank in range(2):
        loader = ShardLoader(_config(tmp_path), rank=rank, world_size=2, tokenizer=tokenizer)
        batches = list(loader)
        assert all(b.images.shape[1:] == (3, 16, 16) for b in batches)
        assert all(b.tokens.shape == (len(b), 12) for b in batches)
        seen += _keys(batches)
    assert sorted(seen) == [f"{i:09d}" for i in range(N)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_carry_each_samples_metadata(shards, tokenizer, num_workers):
    for batch in ShardLoader(_config(shards, num_workers=num_workers), tokenizer=tokenizer):
        assert [m["index"] for m in batch.meta] == [int(k) for k in _keys([batch])]


def test_epochs_reshuffle_and_still_cover_everything(shards, tokenizer):
    loader = ShardLoader(_config(shards, num_workers=0), tokenizer=tokenizer)
    first, second = _keys(loader), _keys(loader)
    assert sorted(first) == sorted(second) == [f"{i:09d}" for i in range(N)]
    assert first != second
    assert loader.epoch == 2


def test_same_seed_same_stream(shards, tokenizer):
    a = list(ShardLoader(_config(shards), tokenizer=tokenizer))
    b = list(ShardLoader(_config(shards), tokenizer=tokenizer))
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))


def _state_after(config, tokenizer, consumed: int) -> dict:
    """The loader's state after handing out ``consumed`` batches of an epoch."""
    interrupted = ShardLoader(config, tokenizer=tokenizer)
    iterator = iter(interrupted)
    for _ in range(consumed):
        next(iterator)
    state = interrupted.state_dict()
    del iterator
    return state


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("num_workers,consumed", [(2, 3), (2, 4), (0, 5), (3, 7)])
def test_resume_gives_the_batches_of_an_uninterrupted_run(shards, tokenizer, num_workers, consumed):
    config = _config(shards, num_workers=num_workers)
    reference = list(ShardLoader(config, tokenizer=tokenizer))

    state = _state_after(config, tokenizer, consumed)
    resumed = ShardLoader(config, tokenizer=tokenizer)
    resumed.load_state_dict(state)
    after = list(resumed)[:8]
    assert len(after) == 8
    for got, want in zip(after, reference[consumed : consumed + 8], strict=True):
        assert got.keys == want.keys
        assert torch.equal(got.images, want.images)
        assert torch.equal(got.tokens, want.tokens)


def test_resume_rejects_a_different_layout(shards, tokenizer):
    state = ShardLoader(_config(shards, num_workers=2), tokenizer=tokenizer).state_dict()
    other = ShardLoader(_config(shards, num_workers=3), tokenizer=tokenizer)
    with pytest.raises(DataError, match="num_workers"):
        other.load_state_dict(state)


def test_bad_data_is_skipped_counted_and_the_epoch_goes_on(tmp_path, tokenizer, caplog):
    corrupt, no_caption = frozenset({3, 40}), frozenset({7})
    paths = write_shards(tmp_path, 60, per_shard=10, corrupt=corrupt, no_caption=no_caption)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # truncated tar: samples 20..29, part lost
    paths[4].write_bytes(b"this is not a tar file")  # unreadable: samples 40..49 lost
    caplog.set_level(logging.WARNING, logger="megabatch.data")
    loader = ShardLoader(_config(tmp_path, num_workers=0), tokenizer=tokenizer)
    keys = set(_keys(loader))
    totals = loader.skipped_total
    assert totals["corrupt_image"] == 1  # sample 40 sits in the unreadable shard
    assert totals["missing_caption"] == 1
    assert totals["bad_shard"] == 2
    good = {f"{i:09d}" for i in range(60) if i not in corrupt | no_caption}
    assert keys <= good
    assert {f"{i:09d}" for i in range(60) if i // 10 not in (2, 4)} & good <= keys
    assert "bad_shard" in caplog.text and "corrupt_image" in caplog.text


def test_simclr_needs_no_captions(tmp_path):
    write_shards(tmp_path, 20, per_shard=5, no_caption=frozenset(range(20)))
    loader = ShardLoader(LoaderConfig(shards=str(tmp_path), captions=False, batch_size=6,
                                      num_workers=0, image=_config(tmp_path).image))  # fmt: skip
    batches = list(loader)
    assert sum(len(b) for b in batches) == 20
    assert batches[0].tokens is None and batches[0].images.dtype == torch.uint8


def test_brace_pattern_and_list_specs(shards, tokenizer):
    pattern = str(shards / "{00000..00009}.tar")
    listed = [str(shards / f"{i:05d}.tar") for i in range(10)]
    for spec in (pattern, listed):
        keys = _keys(ShardLoader(_config(spec, num_workers=0), tokenizer=tokenizer))
        assert sorted(keys) == [f"{i:09d}" for i in range(N)]


def test_pipe_spec_reads_through_a_command(shards, tokenizer):
    spec = f"pipe:cat {shards}/{{00000..00009}}.tar"
    keys = _keys(ShardLoader(_config(spec, num_workers=0), tokenizer=tokenizer))
    assert sorted(keys) == [f"{i:09d}" for i in range(N)]


def test_resampled_is_endless_and_weighted(tmp_path, tokenizer):
    a = write_shards(tmp_path / "a", 40, per_shard=10)
    write_shards(tmp_path / "b", 40, per_shard=10, start=1000)
    sources = [{"shards": str(tmp_path / "a"), "weight": 3.0},
               {"shards": str(tmp_path / "b"), "weight": 1.0}]  # fmt: skip
    loader = ShardLoader(_config(sources, num_workers=0, resampled=True), tokenizer=tokenizer)
    iterator = iter(loader)
    keys = _keys(next(iterator) for _ in range(100))  # 800 samples from 80
    from_a = sum(int(k) < 1000 for k in keys)
    assert len(keys) == 800
    assert 0.65 < from_a / len(keys) < 0.85  # 3:1 by weight, by shard draws of 10
    assert a  # the folders exist


def test_weighted_sources_in_epoch_mode_see_everything_once(tmp_path, tokenizer):
    write_shards(tmp_path / "a", 30, per_shard=10)
    write_shards(tmp_path / "b", 20, per_shard=10, start=1000)
    sources = [{"shards": str(tmp_path / "a"), "weight": 2.0},
               {"shards": str(tmp_path / "b"), "weight": 1.0}]  # fmt: skip
    keys = _keys(ShardLoader(_config(sources, num_workers=2), tokenizer=tokenizer))
    expected = [f"{i:09d}" for i in list(range(30)) + list(range(1000, 1020))]
    assert sorted(keys) == expected


@pytest.mark.parametrize(
    "spec,message",
    [("{missing}/{0..3}.tar", "matches no existing shard"), ("/no/such/folder", "no such")],
)
def test_spec_matching_nothing_fails_at_start(spec, message, tokenizer):
    with pytest.raises(DataError, match=message):
        ShardLoader(_config(spec), tokenizer=tokenizer)


def test_captions_without_a_tokenizer_fail_at_start(shards):
    with pytest.raises(DataError, match="^captions=True needs a tokenizer") as error:
        ShardLoader(LoaderConfig(shards=str(shards)))
    assert "\n" not in str(error.value)


def test_the_tokenizers_context_is_the_token_length(shards, tokenizer_path):
    short = CaptionTokenizer.load(tokenizer_path, context_length=5)
    batch = next(iter(ShardLoader(_config(shards, num_workers=0), tokenizer=short)))
    assert batch.tokens.shape == batch.token_mask.shape == (8, 5)


def test_without_captions_a_tokenizer_is_unused(shards, tokenizer):
    loader = ShardLoader(_config(shards, captions=False, num_workers=0), tokenizer=tokenizer)
    batch = next(iter(loader))
    assert batch.tokens is None and batch.token_mask is None


def test_img2dataset_folder_is_read_unchanged(tmp_path, tokenizer):
    # img2dataset writes NNNNN.tar with NNNNN_stats.json and NNNNN.parquet beside each,
    # and no manifest of ours.
    write_shards(tmp_path, 30, per_shard=10, manifest=False)
    for i in range(3):
        (tmp_path / f"{i:05d}_stats.json").write_text('{"count": 10}')
        (tmp_path / f"{i:05d}.parquet").write_bytes(b"PAR1 not read")
    keys = _keys(ShardLoader(_config(tmp_path, num_workers=0), tokenizer=tokenizer))
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_caption_that_is_not_utf8_skips_its_sample(tmp_path, tokenizer, num_workers):
    # What `data inspect` calls bad_caption the loader does not train on.
    write_shards(tmp_path, 20, per_shard=10, bad_caption=frozenset({4, 13}))
    loader = ShardLoader(_config(tmp_path, num_workers=num_workers), tokenizer=tokenizer)
    keys = _keys(loader)
    assert sorted(keys) == [f"{i:09d}" for i in range(20) if i not in (4, 13)]
    assert loader.skipped_total["bad_caption"] == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skips_after_a_workers_last_batch_are_counted(tmp_path, tokenizer, num_workers):
    # Each worker's last samples are corrupt: no batch follows them to carry the counts.
    write_shards(tmp_path, 20, per_shard=10, corrupt=frozenset({8, 9, 18, 19}))
    loader = ShardLoader(_config(tmp_path, num_workers=num_workers,
                                 batch_size=4, shuffle_block=1), tokenizer=tokenizer)  # fmt: skip
    assert len(_keys(loader)) == 16
    assert loader.skipped_total["corrupt_image"] == 4


@pytest.mark.parametrize("from_end", [1, 2, 3])
def test_resume_after_a_worker_has_finished_its_epoch(tmp_path, tokenizer, from_end):
    # Shards of 20, 20 and 5 samples over 2 workers; with seed 5, worker 1 reads the
    # short one alone: it ends its epoch (its summary carrying the skip of sample 44,
    # after its last batch) long before the checkpoint, near the end of worker 0's.
    write_shards(tmp_path, 45, per_shard=20, corrupt=frozenset({44}))
    config = _config(tmp_path, batch_size=4, shuffle_block=1, seed=5)
    reference_loader = ShardLoader(config, tokenizer=tokenizer)
    reference = list(reference_loader)
    consumed = len(reference) - from_end

    state = _state_after(config, tokenizer, consumed)
    assert state["positions"][1] == 5 and state["skipped_total"]["corrupt_image"] == 1
    resumed = ShardLoader(config, tokenizer=tokenizer)
    resumed.load_state_dict(state)
    after = list(resumed)
    assert [b.keys for b in after] == [b.keys for b in reference[consumed:]]
    assert resumed.skipped_total == reference_loader.skipped_total  # counted once


@pytest.mark.parametrize("compression", ["gzip", "bz2", "lzma"])
def test_compressed_shards_are_read_from_files_and_commands(tmp_path, tokenizer, compression):
    compress = __import__(compression).compress
    (path,) = write_shards(tmp_path / "plain", 10, per_shard=10, manifest=False)
    packed = tmp_path / f"00000.tar.{compression}"
    packed.write_bytes(compress(path.read_bytes()))
    for spec in (str(packed), f"pipe:cat {packed}"):
        loader = ShardLoader(_config(spec, num_workers=0), tokenizer=tokenizer)
        assert sorted(_keys(loader)) == [f"{i:09d}" for i in range(10)]
        assert not +loader.skipped_total  # nothing skipped
