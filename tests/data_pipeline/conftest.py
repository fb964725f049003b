"""Fixtures the reader tests share: one small real shard set and a tokenizer trained on
its captions, built once per test module."""

import pytest

from megabatch.data_pipeline.tokenizer import CaptionTokenizer
from tests.data_pipeline.fake_shards import (
    READER_SAMPLES,
    READER_SHARD_SIZE,
    captions,
    write_shards,
)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    CaptionTokenizer.train(captions(READER_SAMPLES), vocab_size=300, context_length=12).save(path)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, READER_SAMPLES, per_shard=READER_SHARD_SIZE)
    return folder
