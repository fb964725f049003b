"""Fixtures the reader tests share: one small real shard set and a tokenizer trained on
its captions (the file, and loaded with a context of TOKENIZER_CONTEXT), built once per
test module."""

import pytest

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from tests.data_pipeline.fake_shards import (
    READER_SAMPLES,
    READER_SHARD_SIZE,
    captions,
    write_shards,
)

TOKENIZER_CONTEXT = 12


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    CaptionTokenizer.train(
        captions(READER_SAMPLES), vocab_size=300, context_length=TOKENIZER_CONTEXT
    ).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    """What the loader tests give ShardLoader: the tokenizer file, loaded."""
    return CaptionTokenizer.load(tokenizer_path, context_length=TOKENIZER_CONTEXT)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, READER_SAMPLES, per_shard=READER_SHARD_SIZE)
    return folder
