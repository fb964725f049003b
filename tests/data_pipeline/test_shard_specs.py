"""Shard specifications: folders, manifests, patterns, paths, ``pipe:`` commands and
weighted lists, resolved to shard sets (``data inspect``) and sources (the loader)."""

import json
import os
import re

import pytest

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.shard_specs import ShardSource, resolve_shards, resolve_sources
from tests.data_pipeline.fake_shards import write_shards


def test_a_folder_with_a_manifest_gives_its_shards_and_counts(tmp_path):
    paths = write_shards(tmp_path, 25, per_shard=10)
    shard_set = resolve_shards(tmp_path)
    assert shard_set.paths == paths
    assert shard_set.expected_samples == [10, 10, 5]
    assert shard_set.manifests == [tmp_path / "manifest.json"]
    (source,) = resolve_sources(str(tmp_path))
    assert source.urls == tuple(str(p.absolute()) for p in paths)
    assert source.counts == (10, 10, 5) and source.counts_known and source.weight == 1.0


def test_a_folder_without_a_manifest_gives_its_sorted_tars_without_counts(tmp_path):
    paths = write_shards(tmp_path, 25, per_shard=10, manifest=False)
    (tmp_path / "00000_stats.json").write_text("{}")  # img2dataset's side files: not shards
    shard_set = resolve_shards(tmp_path)
    assert shard_set.paths == paths and shard_set.expected_samples == [None] * 3
    assert not resolve_sources(tmp_path)[0].counts_known


def test_relative_names_become_absolute_paths(tmp_path, monkeypatch):
    write_shards(tmp_path, 10, per_shard=5)
    monkeypatch.chdir(tmp_path)
    for spec in (".", "manifest.json", "{00000..00001}.tar", ["00000.tar", "00001.tar"]):
        (source,) = resolve_sources(spec)
        assert all(os.path.isabs(url) for url in source.urls), spec
        assert [os.path.basename(url) for url in source.urls] == ["00000.tar", "00001.tar"]


def test_a_pipe_spec_is_one_command_per_shard_without_counts(tmp_path):
    write_shards(tmp_path, 10, per_shard=5)
    (source,) = resolve_sources([f"pipe:cat {tmp_path}/{{00000..00001}}.tar", str(tmp_path)])
    assert source.urls[:2] == (f"pipe:cat {tmp_path}/00000.tar", f"pipe:cat {tmp_path}/00001.tar")
    assert source.counts == (None, None, 5, 5)


def test_weighted_sources_keep_their_weights_and_refuse_nonpositive_ones(tmp_path):
    write_shards(tmp_path / "a", 10, per_shard=5)
    write_shards(tmp_path / "b", 10, per_shard=5)
    a, b = resolve_sources([{"shards": str(tmp_path / "a"), "weight": 3},
                            {"shards": str(tmp_path / "b")}])  # fmt: skip
    assert (a.weight, b.weight) == (3.0, 1.0)
    with pytest.raises(DataError, match="source weight must be > 0, got 0.0"):
        resolve_sources([{"shards": str(tmp_path / "a"), "weight": 0}])


def test_a_spec_that_matches_no_existing_shard_is_refused_by_the_loaders_resolver(tmp_path):
    pattern = f"{tmp_path}/{{00000..00003}}.tar"
    assert len(resolve_shards(pattern).paths) == 4  # `data inspect` reports them missing
    with pytest.raises(DataError, match="matches no existing shard"):
        resolve_sources(pattern)
    with pytest.raises(DataError, match="no shards given"):
        resolve_shards([])


def test_the_manifests_word_on_captions_survives_a_list_only_when_they_agree(tmp_path):
    for name in ("a", "b"):
        write_shards(tmp_path / name, 4, per_shard=2)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        manifest["has_captions"] = name == "a"
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    assert resolve_shards(tmp_path / "a").has_captions is True
    assert resolve_shards([tmp_path / "a", tmp_path / "a"]).has_captions is True
    assert resolve_shards([tmp_path / "a", tmp_path / "b"]).has_captions is None


def test_a_shard_source_holds_absolute_paths_or_commands_only():
    ShardSource(("/data/00000.tar", "pipe:cat x.tar"), (None, None))
    with pytest.raises(ValueError, match="is not absolute"):
        ShardSource(("00000.tar",), (None,))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": 5}, "shard 0's name is not a file name: 5"),
        ({"name": ""}, "shard 0's name is not a file name: ''"),
        ({"name": "00000.tar", "samples": "ten"}, "shard '00000.tar' has a bad sample count"),
        ({"name": "00000.tar", "samples": -1}, "shard '00000.tar' has a bad sample count"),
    ],
)
def test_a_manifest_with_bad_entries_is_one_dataerror(tmp_path, entry, message):
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    for resolve in (resolve_shards, resolve_sources):  # `data inspect` and the loader
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'manifest.json'}: {message}")):
            resolve(tmp_path)
