import numpy as np
import pytest
import torch

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer

CAPTIONS = [f"a photo of the digit {w}" for w in ["zero", "one", "two", "three"]] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer.train(CAPTIONS, vocab_size=300, context_length=16)


def test_fixed_length_with_start_end_and_padding(tokenizer):
    ids, mask = tokenizer(["A photo of the digit two", "one"])
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert mask.shape == (2, 16) and mask.dtype == torch.bool
    for row, m in zip(ids, mask, strict=True):
        real = row[m]
        assert real[0] == tokenizer.sot_id and real[-1] == tokenizer.eot_id
        assert (row[~m] == tokenizer.pad_id).all()
    # Lower-cased: the capital letter does not change the encoding.
    assert torch.equal(ids[0], tokenizer(["a photo of the digit two"])[0][0])
    assert tokenizer.decode(ids[0]) == "a photo of the digit two"


def test_long_captions_keep_the_end_token(tokenizer):
    ids, mask = tokenizer([" ".join(["digit"] * 100)])
    assert mask.all()
    assert ids[0, 0] == tokenizer.sot_id and ids[0, -1] == tokenizer.eot_id


def test_unseen_characters_are_encoded_not_dropped(tokenizer):
    ids, mask = tokenizer(["ß ∑ 🙂"])  # byte-level: every byte is in the vocabulary
    assert mask.sum() > 2


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = CaptionTokenizer.load(path, context_length=16)
    assert torch.equal(loaded(CAPTIONS[:5])[0], tokenizer(CAPTIONS[:5])[0])
    assert not (tmp_path / "tokenizer.json.partial").exists()


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="megabatch data tokenizer"):
        CaptionTokenizer.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no captions"):
        CaptionTokenizer.train([], vocab_size=300)
    with pytest.raises(ValueError, match="context_length"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=300, context_length=2)


ODD_CAPTIONS = [
    "A photo of the digit two",
    " ".join(["digit"] * 100),  # truncated before the end token
    "ß ∑ 🙂",
    "x",
    "<pad> looks like padding <|endoftext|> and an end",  # special tokens in the text
    "  spaces   around  ",
    "",  # only the start and end tokens
]


def _padded_reference(tok: CaptionTokenizer, captions):
    """What __call__ returned before batches were encoded unpadded: the padded encodings."""
    encodings = tok.tokenizer.encode_batch(captions)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
    return ids, mask


def test_batch_encoding_equals_the_padded_encodings(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    # A loaded tokenizer.json pads already: the unpadded copy must drop that padding.
    for tok in (tokenizer, CaptionTokenizer.load(path, context_length=16)):
        ids, mask = tok(ODD_CAPTIONS)
        want_ids, want_mask = _padded_reference(tok, ODD_CAPTIONS)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
        assert not mask.all()  # short captions are padded, and the mask says so


def test_shortest_context_holds_one_token_between_start_and_end():
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=300, context_length=3)
    ids, mask = tok(ODD_CAPTIONS)
    want_ids, want_mask = _padded_reference(tok, ODD_CAPTIONS)
    assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)


def test_encode_into_writes_given_arrays(tokenizer):
    ids = np.full((len(ODD_CAPTIONS), 16), -1, dtype=np.int64)
    mask = np.zeros((len(ODD_CAPTIONS), 16), dtype=bool)
    tokenizer.encode_into(ODD_CAPTIONS, ids, mask)
    want_ids, want_mask = tokenizer(ODD_CAPTIONS)
    assert np.array_equal(ids, want_ids.numpy()) and np.array_equal(mask, want_mask.numpy())
    empty_ids, empty_mask = tokenizer([])
    assert empty_ids.shape == (0, 16) and empty_mask.shape == (0, 16)


def test_captions_from_shards_skips_what_the_loader_skips(tmp_path):
    from megabatch.data_pipeline.read.tokenizer import captions_from_shards
    from tests.data_pipeline.fake_shards import write_shards

    write_shards(tmp_path, 10, per_shard=5, bad_caption=frozenset({2}), no_caption=frozenset({7}))
    captions = list(captions_from_shards(tmp_path))
    assert captions == [f"a photo of sample {i}" for i in range(10) if i not in (2, 7)]
