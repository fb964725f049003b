"""A batch's metadata: raw .json bytes from the worker, parsed where first read."""

import pickle

from megabatch.data_pipeline.read.metadata import SampleMetadata

RAW = [b'{"label": 7, "caption": "handwritten 7"}', None, b"", b"{not json", b"[1, 2]", b"\xff"]


def test_each_sample_reads_as_its_dict_and_bad_metadata_as_empty():
    meta = SampleMetadata(RAW)
    assert len(meta) == 6
    assert meta[0] == {"label": 7, "caption": "handwritten 7"}
    # None/empty: no .json; then not JSON, not an object, not UTF-8: none costs the sample.
    assert list(meta)[1:] == [{}] * 5
    assert [m.get("label", -1) for m in meta] == [7, -1, -1, -1, -1, -1]
    assert meta[:1] == [{"label": 7, "caption": "handwritten 7"}]
    assert meta == SampleMetadata(RAW) and meta != [{}]


def test_parsed_once_on_first_read_not_when_made_or_sent():
    meta = SampleMetadata(RAW[:1])
    assert meta._parsed is None  # a worker building the batch parses nothing
    sent = pickle.loads(pickle.dumps(meta))
    assert sent._parsed is None  # the raw bytes travel, not dicts
    first = sent[0]
    assert sent[0] is first  # parsed once, then kept
    assert sent == meta
