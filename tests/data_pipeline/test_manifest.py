"""manifest.json: written and read by one module, its format version checked on read;
what cannot be read is one DataError line naming the file."""

import json
import re

import pytest

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SUPPORTED_VERSIONS,
    Manifest,
    ManifestShard,
    manifest_dict,
    read_manifest,
    write_manifest,
)
from megabatch.data_pipeline.shard_specs import resolve_shards, resolve_sources
from megabatch.data_pipeline.write.sources import ImageFolderSource
from megabatch.data_pipeline.write.writer import ShardOptions, write_shards
from megabatch.trainer.cli import main
from tests.data_pipeline.fake_shards import write_shards as write_fake_shards
from tests.data_pipeline.helpers import make_caption_folder


def _manifest(**changes) -> dict:
    manifest = manifest_dict(
        split="train",
        source="a test",
        has_captions=True,
        shards=[
            {"name": "00000.tar", "samples": 3, "bytes": 10240},
            {"name": "00001.tar", "samples": 2, "bytes": 10240},
        ],  # fmt: skip
        skipped=[{"index": 5, "source": "x.png", "reason": "empty caption"}],
        fingerprint={"source": "a test"},
    )
    return {**manifest, **changes}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_round_trip(tmp_path):
    path = tmp_path / MANIFEST_NAME
    written = _manifest()
    write_manifest(path, written)
    assert not list(tmp_path.glob("*.partial"))  # written under a temporary name, renamed
    manifest = read_manifest(path)
    assert manifest == Manifest(
        path=path,
        version=MANIFEST_VERSION,
        shards=(ManifestShard("00000.tar", 3), ManifestShard("00001.tar", 2)),
        has_captions=True,
        data=written,
    )
    assert manifest.shard_paths == [tmp_path / "00000.tar", tmp_path / "00001.tar"]
    assert written["format"] == MANIFEST_FORMAT
    assert written["format_version"] == MANIFEST_VERSION in SUPPORTED_VERSIONS
    assert written["total_samples"] == 5


def test_the_writers_manifest_is_written_and_read_by_this_module(tmp_path):
    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 5))
    result = write_shards(source, tmp_path / "out", ShardOptions(max_samples_per_shard=2))
    manifest = read_manifest(tmp_path / "out" / MANIFEST_NAME)
    assert manifest.data == result.manifest
    assert manifest.version == 1 and manifest.has_captions is True
    assert [s.samples for s in manifest.shards] == [2, 2, 1]
    assert list(result.manifest)[:2] == ["format", "format_version"]


def test_a_manifest_without_a_version_is_version_1(tmp_path):
    # What hand-written manifests (and the reader tests' fake shards) look like.
    write_fake_shards(tmp_path, 5, per_shard=3)
    manifest = read_manifest(tmp_path / MANIFEST_NAME)
    assert manifest.version == 1 and manifest.has_captions is None
    assert [(s.name, s.samples) for s in manifest.shards] == [("00000.tar", 3), ("00001.tar", 2)]


@pytest.mark.parametrize("version", [2, 0, "1", True, None, [1]])
def test_an_unknown_version_is_refused_naming_the_file_and_the_versions(tmp_path, version):
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(_manifest(format_version=version)))
    with pytest.raises(DataError) as error:
        read_manifest(path)
    assert _one_line(error) == (
        f"{path}: manifest format_version {version!r} is not supported (this version of "
        "megabatch reads format_version 1)"
    )


def test_every_reader_refuses_a_newer_manifest(tmp_path, capsys):
    write_fake_shards(tmp_path / "shards", 4, per_shard=2)
    path = tmp_path / "shards" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": MANIFEST_VERSION + 1}))
    message = re.escape(f"{path}: manifest format_version {MANIFEST_VERSION + 1}")
    for resolve in (resolve_shards, resolve_sources):  # `data inspect`, the loader
        with pytest.raises(DataError, match=message):
            resolve(tmp_path / "shards")
    assert main(["data", "inspect", str(tmp_path / "shards")]) == 2
    assert "is not supported" in capsys.readouterr().err
    # The writer does not take a newer set in its output folder for a finished one.
    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 2))
    with pytest.raises(DataError, match=message):
        write_shards(source, tmp_path / "shards")


def test_a_missing_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "nowhere" / MANIFEST_NAME
    with pytest.raises(DataError) as error:
        read_manifest(path)
    assert _one_line(error).startswith(f"cannot read manifest {path}: ")
    assert "No such file" in str(error.value)


@pytest.mark.parametrize("content", [b'{"shards": [', b"\xff\xfe not text", b""])
def test_a_corrupt_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / MANIFEST_NAME
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_manifest(path)
    assert _one_line(error).startswith(f"cannot read manifest {path}: ")


@pytest.mark.parametrize(
    "data", [[{"name": "00000.tar"}], {"files": []}, {"shards": "00000.tar"}, {"shards": [3]}]
)
def test_json_that_is_not_a_manifest_is_refused(tmp_path, data):
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as error:
        read_manifest(path)
    assert _one_line(error) == f"{path} is not a shard manifest (no 'shards' list of names)"


def test_another_format_is_not_a_manifest(tmp_path):
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps(_manifest(format="someone-elses")))
    with pytest.raises(DataError) as error:
        read_manifest(path)
    assert _one_line(error) == (
        f"{path} is not a shard manifest (format 'someone-elses', not 'megabatch-shards')"
    )
