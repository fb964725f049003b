"""Shard names from a manifest or a folder listing are paths, never commands: only a
``pipe:`` specification the user wrote runs one. Each test plants a name whose command
would create a marker file and reads the shards from the current folder, where
``Path(".") / name`` is the bare name."""

import json

import pytest

from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.tokenizer import captions_from_shards
from megabatch.data_pipeline.read.transforms import ImageConfig
from megabatch.data_pipeline.write.inspect_shards import inspect_shards
from megabatch.trainer.cli import main
from tests.data_pipeline.fake_shards import write_shards

MARKER = "planted_marker"
# A real command: it would create the marker and then stream a valid shard, so that
# reading it "works" and only the marker (and the doubled samples) would tell.
PLANTED = f"pipe:touch {MARKER}; cat 00000.tar"
KEYS = [f"{i:09d}" for i in range(10)]


def _loader(spec, tokenizer):
    return ShardLoader(LoaderConfig(shards=spec, batch_size=4, num_workers=0,
                                    image=ImageConfig(size=16)), tokenizer=tokenizer)  # fmt: skip


def _keys(loader):
    return sorted(k.split("#")[1] for batch in loader for k in batch.keys)


@pytest.fixture
def planted_manifest(tmp_path, monkeypatch):
    write_shards(tmp_path, 10, per_shard=10)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"].append({"name": PLANTED, "samples": 10})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def planted_file(tmp_path, monkeypatch):
    write_shards(tmp_path, 10, per_shard=10, manifest=False)
    (tmp_path / PLANTED).write_bytes(b"")  # a plain, empty file: an unreadable shard
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("spec", ["manifest.json", "."])
def test_a_manifest_entry_is_read_as_a_missing_file(planted_manifest, tokenizer, spec):
    loader = _loader(spec, tokenizer)
    assert _keys(loader) == KEYS  # once each: the command's copy of 00000.tar never ran
    assert loader.skipped_total["bad_shard"] == 1
    assert sorted(captions_from_shards(spec)) == sorted(f"a photo of sample {i}" for i in range(10))
    report = inspect_shards(spec)
    assert [(p.shard.rsplit("/", 1)[-1], p.kind) for p in report.problems] == [
        (PLANTED, "missing_shard")
    ]
    assert not (planted_manifest / MARKER).exists()


def test_a_file_named_like_a_command_is_read_as_a_file(planted_file, tokenizer, capsys):
    loader = _loader(".", tokenizer)
    assert _keys(loader) == KEYS
    assert loader.skipped_total["bad_shard"] == 1  # the empty file
    report = inspect_shards(".")
    assert {(p.shard, p.kind) for p in report.problems} == {(PLANTED, "unreadable_tar")}
    assert main(["data", "tokenizer", ".", "--out", "tok.json", "--vocab-size", "300"]) == 0
    assert "from 10 captions" in capsys.readouterr().out
    assert not (planted_file / MARKER).exists()


def test_a_pipe_spec_the_user_wrote_still_runs(shards, tokenizer, tmp_path):
    marker = tmp_path / "ran"
    spec = f"pipe:touch {marker}; cat {shards}/00000.tar"
    assert len(_keys(_loader(spec, tokenizer))) == 13
    assert marker.exists()
