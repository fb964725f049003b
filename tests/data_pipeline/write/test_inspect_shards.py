"""The shard checker: clean sets, corrupt images, missing members, truncated tars, and
the ways to name a shard set (folder, manifest, brace pattern, list)."""

import json

import pytest

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.shard_specs import resolve_shards
from megabatch.data_pipeline.write.inspect_shards import inspect_shards
from megabatch.data_pipeline.write.sources import ImageFolderSource
from megabatch.data_pipeline.write.writer import ShardOptions, write_shards
from tests.data_pipeline.helpers import jpeg_bytes, make_caption_folder, write_tar


def _sample(key: str, seed: int, caption: str | None = "a caption") -> list[tuple[str, bytes]]:
    members = [(f"{key}.jpg", jpeg_bytes(seed))]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", json.dumps({"key": key}).encode()))
    return members


def _img2dataset_folder(folder):
    """Three shards the way img2dataset writes them, with its side files."""
    folder.mkdir()
    for shard in range(3):
        members = []
        for i in range(4):
            members += _sample(f"{shard:05d}{i:04d}", seed=10 * shard + i)
        write_tar(folder / f"{shard:05d}.tar", members)
        (folder / f"{shard:05d}_stats.json").write_text('{"successes": 4}')
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by the checker")
    return folder


def test_clean_img2dataset_output_is_clean(tmp_path):
    folder = _img2dataset_folder(tmp_path / "shards")
    report = inspect_shards(folder)
    assert report.ok, report.format()
    assert (report.num_shards, report.total_samples) == (3, 12)
    assert report.captions_expected and report.manifests == []
    assert "3 shards, 12 samples (captions expected): ok" in report.format()


def test_every_way_to_name_the_shards_finds_the_same_set(tmp_path):
    folder = _img2dataset_folder(tmp_path / "shards")
    by_pattern = inspect_shards(f"{folder}/{{00000..00002}}.tar")
    by_list = inspect_shards([folder / "00000.tar", folder / "00001.tar", folder / "00002.tar"])
    by_path = inspect_shards(folder / "00001.tar")
    assert (by_pattern.num_shards, by_pattern.total_samples) == (3, 12)
    assert (by_list.num_shards, by_list.total_samples) == (3, 12)
    assert (by_path.num_shards, by_path.total_samples) == (1, 4)

    missing = inspect_shards(f"{folder}/{{00000..00003}}.tar")
    assert [(p.shard, p.kind) for p in missing.problems] == [
        (str(folder / "00003.tar"), "missing_shard")
    ]
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.json and no .tar files"):
        resolve_shards(tmp_path / "empty")


def test_our_shards_are_read_through_the_manifest(tmp_path):
    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 7))
    write_shards(source, tmp_path / "out", ShardOptions(max_samples_per_shard=3))
    for spec in (tmp_path / "out", tmp_path / "out" / "manifest.json"):
        report = inspect_shards(spec)
        assert report.ok, report.format()
        assert (report.num_shards, report.total_samples) == (3, 7)
        assert report.manifests == [str(tmp_path / "out" / "manifest.json")]

    # The manifest's counts are checked, and so are its shards' presence.
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["samples"] = 4
    manifest_path.write_text(json.dumps(manifest))
    (tmp_path / "out" / "00002.tar").unlink()
    report = inspect_shards(tmp_path / "out")
    kinds = [(p.shard.rsplit("/", 1)[-1], p.kind) for p in report.problems]
    assert kinds == [("00000.tar", "sample_count"), ("00002.tar", "missing_shard")]


def test_a_list_of_folders_and_patterns_is_their_shards_in_order(tmp_path):
    for name, n in (("train", 5), ("val", 2)):
        source = ImageFolderSource(make_caption_folder(tmp_path / f"src_{name}", n))
        write_shards(source, tmp_path / name, ShardOptions(max_samples_per_shard=2))
    folder = _img2dataset_folder(tmp_path / "img2dataset")
    spec = [
        tmp_path / "train",
        tmp_path / "val" / "manifest.json",
        f"{folder}/{{00001..00002}}.tar",
    ]
    report = inspect_shards(spec)
    assert report.ok, report.format()
    assert (report.num_shards, report.total_samples) == (3 + 1 + 2, 5 + 2 + 8)
    assert report.manifests == [str(tmp_path / n / "manifest.json") for n in ("train", "val")]
    assert [s.path.rsplit("/", 1)[-1] for s in report.shards][-2:] == ["00001.tar", "00002.tar"]


def test_corrupt_image_missing_members_and_truncated_tar_are_located(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(folder / "00000.tar", _sample("000000000", 0) + _sample("000000001", 1))
    broken_jpeg = jpeg_bytes(2)[:60]  # a JPEG cut short: the header parses, decoding fails
    write_tar(
        folder / "00001.tar",
        [("000000002.jpg", broken_jpeg), ("000000002.txt", b"a caption")]
        + _sample("000000003", 3, caption=None)  # no .txt
        + [("000000004.txt", b"a caption without its image")]
        + _sample("000000005", 5, caption=""),
    )
    # A shard cut in the middle of sample 7's image.
    whole = write_tar(folder / "00002.tar", _sample("000000006", 6) + _sample("000000007", 7))
    data = whole.read_bytes()
    offset = data.index(b"000000007.jpg") + 512 + 100  # its header, then 100 bytes of JPEG
    whole.write_bytes(data[:offset])
    # A shard cut exactly between two members: tarfile alone would not notice.
    whole = write_tar(folder / "00003.tar", _sample("000000008", 8))
    data = whole.read_bytes()
    whole.write_bytes(data[: data.index(b"000000008.json")])

    report = inspect_shards(folder)
    assert not report.ok
    found = {(p.shard.rsplit("/", 1)[-1], p.key, p.kind) for p in report.problems}
    assert found == {
        ("00001.tar", "000000002", "corrupt_image"),
        ("00001.tar", "000000003", "missing_caption"),
        ("00001.tar", "000000004", "missing_image"),
        ("00001.tar", "000000005", "empty_caption"),
        ("00002.tar", "000000007", "unreadable_tar"),
        ("00003.tar", None, "unreadable_tar"),
    }
    by_shard = {s.path.rsplit("/", 1)[-1]: (s.samples, s.readable) for s in report.shards}
    assert by_shard == {
        "00000.tar": (2, True),
        "00001.tar": (4, True),
        "00002.tar": (1, False),
        "00003.tar": (1, False),
    }
    # Without captions expected, a sample with no .txt is fine.
    relaxed = inspect_shards(folder / "00001.tar", captions=False)
    assert "missing_caption" not in {p.kind for p in relaxed.problems}

    text = report.format()
    assert "6 problems" in text and "[000000002]: corrupt_image" in text


def test_image_only_shards_need_no_captions(tmp_path):
    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 3), captions=False)
    write_shards(source, tmp_path / "out")
    report = inspect_shards(tmp_path / "out")
    assert report.ok and not report.captions_expected
    assert inspect_shards(tmp_path / "out", captions=True).problems[0].kind == "missing_caption"
