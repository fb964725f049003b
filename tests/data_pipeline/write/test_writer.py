"""The shard writer: layout, limits, encoding, skips, and resuming an interrupted write."""

import io
import json
import os

import pytest
from PIL import Image

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.shard_format import shard_name, tar_archive_bytes, tar_member_bytes
from megabatch.data_pipeline.write.sources import ImageFolderSource
from megabatch.data_pipeline.write.writer import JOURNAL_NAME, ShardOptions, write_shards
from tests.data_pipeline.helpers import (
    folder_bytes,
    make_caption_folder,
    read_members,
    save_image,
)


def test_layout_keys_members_and_manifest(tmp_path):
    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 10))
    result = write_shards(source, tmp_path / "out", ShardOptions(max_samples_per_shard=4))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
        "manifest.json",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result.manifest
    assert [(s["name"], s["samples"]) for s in manifest["shards"]] == [
        ("00000.tar", 4),
        ("00001.tar", 4),
        ("00002.tar", 2),
    ]
    assert manifest["total_samples"] == 10 and manifest["skipped"] == []
    assert manifest["source"] == source.description and manifest["has_captions"]
    for shard in manifest["shards"]:
        assert (out / shard["name"]).stat().st_size == shard["bytes"]

    names = [name for name, _ in read_members(out / "00001.tar")]
    assert names[:3] == ["000000004.jpg", "000000004.txt", "000000004.json"]
    assert len(names) == 12
    members = dict(read_members(out / "00000.tar"))
    record = json.loads(members["000000001.json"])
    # Sample 1 is img02.webp (sorted by path): re-encoded to JPEG.
    assert record == {
        "key": "000000001",
        "source": "img02.webp",
        "caption": "caption number 2",
        "width": 12,
        "height": 10,
    }
    assert members["000000001.txt"] == b"caption number 2"
    assert members["000000001.jpg"][:2] == b"\xff\xd8"
    # JPEG input is copied byte for byte.
    assert members["000000000.jpg"] == (tmp_path / "src" / "img00.jpg").read_bytes()


def test_images_only_shards_have_no_captions(tmp_path):
    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 3), captions=False)
    write_shards(source, tmp_path / "out")
    names = [name for name, _ in read_members(tmp_path / "out" / "00000.tar")]
    assert not [n for n in names if n.endswith(".txt")] and len(names) == 6
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["has_captions"] is False


def test_byte_limit_is_respected_and_predicted_exactly(tmp_path):
    root = tmp_path / "src"
    for i in range(30):
        save_image(root / f"{i:02d}.png", seed=i, size=(24 + i % 7, 24))
    limit = 4 * 10240
    write_shards(
        ImageFolderSource(root, captions=False),
        tmp_path / "out",
        ShardOptions(max_samples_per_shard=None, max_bytes_per_shard=limit),
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 3 and manifest["total_samples"] == 30
    for shard in manifest["shards"]:
        path = tmp_path / "out" / shard["name"]
        assert path.stat().st_size <= limit
        members = read_members(path)
        assert path.stat().st_size == tar_archive_bytes(
            sum(tar_member_bytes(len(data)) for _, data in members)
        )


def test_unreadable_samples_are_skipped_counted_and_listed(tmp_path):
    root = make_caption_folder(tmp_path / "src", 6)
    (root / "img03.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "img04.txt").write_text("  \n")
    result = write_shards(ImageFolderSource(root), tmp_path / "out")
    assert result.total_samples == 4
    assert [(s["source"], s["index"]) for s in result.skipped] == [
        ("img03.jpg", 2),
        ("img04.png", 3),
    ]
    assert "image does not decode" in result.skipped[0]["reason"]
    assert result.skipped[1]["reason"] == "empty caption"
    keys = sorted({name.split(".")[0] for name, _ in read_members(tmp_path / "out" / "00000.tar")})
    assert keys == ["000000000", "000000001", "000000004", "000000005"]


class _Crash(Exception):
    pass


def _crash_after(shard_index):
    def hook(record):
        if record.name == shard_name(shard_index):
            raise _Crash(record.name)

    return hook


class _FailingSource(ImageFolderSource):
    """Raises while reading one sample: a crash in the middle of a shard."""

    fail_at = 12

    def load(self, index):
        if index == self.fail_at:
            raise _Crash(f"sample {index}")
        return super().load(index)


def test_interrupted_write_resumes_to_identical_shards(tmp_path):
    root = make_caption_folder(tmp_path / "src", 23)
    options = ShardOptions(max_samples_per_shard=5)
    write_shards(ImageFolderSource(root), tmp_path / "clean", options)
    expected = folder_bytes(tmp_path / "clean")

    out = tmp_path / "out"
    with pytest.raises(_Crash):
        write_shards(ImageFolderSource(root), out, options, on_shard_complete=_crash_after(1))
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", JOURNAL_NAME]
    kept = {name: os.stat(out / name) for name in ("00000.tar", "00001.tar")}
    # What a killed process can leave besides: a half-written shard, a shard renamed into
    # place but not yet journaled, and a journal line cut short.
    (out / "00002.tar.partial").write_bytes(b"half a shard")
    (out / "00002.tar").write_bytes(b"renamed, never journaled")
    with open(out / JOURNAL_NAME, "a") as journal:
        journal.write('{"name": "00002.tar", "sam')

    result = write_shards(ImageFolderSource(root), out, options)
    assert (result.shards_kept, result.shards_written) == (2, 3)
    assert folder_bytes(out) == expected
    for name, before in kept.items():  # kept, not rewritten
        after = os.stat(out / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    again = write_shards(ImageFolderSource(root), out, options)
    assert (again.shards_kept, again.shards_written, again.already_complete) == (5, 0, True)
    assert folder_bytes(out) == expected


def test_crash_inside_a_shard_removes_its_partial_and_resumes(tmp_path):
    root = make_caption_folder(tmp_path / "src", 23)
    options = ShardOptions(max_samples_per_shard=5)
    write_shards(ImageFolderSource(root), tmp_path / "clean", options)

    out = tmp_path / "out"
    with pytest.raises(_Crash):
        write_shards(_FailingSource(root), out, options)
    # Samples 0-9 made two complete shards; shard 2 (from sample 10) was discarded.
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", JOURNAL_NAME]
    result = write_shards(ImageFolderSource(root), out, options)
    assert (result.shards_kept, result.shards_written) == (2, 3)
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_rerun_with_other_options_or_source_is_refused(tmp_path):
    root = make_caption_folder(tmp_path / "src", 12)
    out = tmp_path / "out"
    with pytest.raises(_Crash):
        write_shards(
            ImageFolderSource(root),
            out,
            ShardOptions(max_samples_per_shard=5),
            on_shard_complete=_crash_after(0),
        )
    with pytest.raises(DataError, match="interrupted write of another source or with other"):
        write_shards(ImageFolderSource(root), out, ShardOptions(max_samples_per_shard=6))
    write_shards(ImageFolderSource(root), out, ShardOptions(max_samples_per_shard=5))
    save_image(root / "img99.jpg").with_suffix(".txt").write_text("one more")
    with pytest.raises(DataError, match="already holds a finished shard set"):
        write_shards(ImageFolderSource(root), out, ShardOptions(max_samples_per_shard=5))


def test_foreign_tars_in_the_output_are_refused_not_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(DataError, match="did not record"):
        write_shards(ImageFolderSource(make_caption_folder(tmp_path / "src", 2)), out)
    assert (out / "00000.tar").read_bytes() == b"someone else's shard"


def test_transparent_png_is_flattened_onto_white(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(root / "clear.png")
    write_shards(ImageFolderSource(root, captions=False), tmp_path / "out")
    jpeg = dict(read_members(tmp_path / "out" / "00000.tar"))["000000000.jpg"]
    pixel = Image.open(io.BytesIO(jpeg)).convert("RGB").getpixel((4, 4))
    assert min(pixel) > 240


@pytest.mark.parametrize(
    "options, message",
    [
        (ShardOptions(max_samples_per_shard=0), "max_samples_per_shard must be a positive"),
        (ShardOptions(max_samples_per_shard=None), "set max_samples_per_shard or"),
        (ShardOptions(jpeg_quality=101), "jpeg_quality must be"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, options, message):
    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 2))
    with pytest.raises(DataError, match=message):
        write_shards(source, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    source = ImageFolderSource(make_caption_folder(tmp_path / "src", 5))
    write_shards(source, tmp_path / "out", ShardOptions(max_samples_per_shard=2))
    urls = str(tmp_path / "out" / "{00000..00002}.tar")
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    samples = list(dataset)
    assert len(samples) == 5
    image, caption, record = samples[1]
    assert image.size == (12, 10) and caption == record["caption"] == "caption number 2"


def test_two_writes_of_the_same_input_give_the_same_manifest(tmp_path):
    root = make_caption_folder(tmp_path / "src", 6)
    (root / "img03.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # PIL names its BytesIO
    (root / "img05.webp").write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 cut")
    (root / "img04.txt").write_bytes(b"caf\xe9\n")  # not UTF-8
    first = write_shards(ImageFolderSource(root), tmp_path / "a").manifest
    second = write_shards(ImageFolderSource(root), tmp_path / "b").manifest
    assert first == second
    reasons = [skip["reason"] for skip in first["skipped"]]
    assert len(reasons) == 3
    assert not [r for r in reasons if "0x" in r or str(tmp_path) in r], reasons
    assert "image does not decode: UnidentifiedImageError: cannot identify image file" in reasons
