"""Memory bombs: images that decode to too many pixels and tar members too big to hold
are skipped unread and counted under their own kinds, by the loader, `data inspect`
and `data write` alike (megabatch.data_pipeline.limits)."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.limits import DEFAULT_MAX_PIXELS
from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.transforms import ImageConfig
from megabatch.data_pipeline.write.inspect_shards import inspect_shards
from megabatch.data_pipeline.write.sources import ImageFolderSource
from megabatch.data_pipeline.write.writer import write_shards
from megabatch.trainer.cli import main
from tests.data_pipeline.fake_shards import (
    gzip_tar_with_zeros,
    jpeg_bytes,
    png_bytes,
    tar_member,
)
from tests.data_pipeline.helpers import make_caption_folder, save_image, write_tar

REPO = Path(__file__).resolve().parents[2]
# Just over the default cap (8192 x 8192), and under PIL's own limit: only ours refuses it.
BIG_SIDE = 8193


def _jpeg(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _simclr(spec, **kw) -> ShardLoader:
    image = kw.pop("image", ImageConfig(size=16))
    return ShardLoader(LoaderConfig(shards=spec, captions=False, batch_size=4, num_workers=0,
                                    image=image, **kw))  # fmt: skip


def _keys(loader) -> list[str]:
    return [k.split("#")[1] for batch in loader for k in batch.keys]


def test_an_image_over_the_default_pixel_cap_is_skipped_undecoded(tmp_path, capsys):
    big = png_bytes(BIG_SIDE, BIG_SIDE)  # 8 MB of pixels as 1-bit, 200 MB as RGB
    assert BIG_SIDE**2 > DEFAULT_MAX_PIXELS and len(big) < 100_000
    write_tar(tmp_path / "00000.tar", [("000000000.jpg", jpeg_bytes(0)),
                                       ("000000001.png", big),
                                       ("000000002.jpg", jpeg_bytes(2))])  # fmt: skip
    loader = _simclr(tmp_path)
    assert _keys(loader) == ["000000000", "000000002"]
    assert loader.skipped_total["oversized_image"] == 1
    assert loader.skipped_total["corrupt_image"] == 0  # its own kind

    report = inspect_shards(tmp_path)
    assert [(p.key, p.kind) for p in report.problems] == [("000000001", "oversized_image")]

    source = tmp_path / "src"
    make_caption_folder(source, 2, captions=False)
    (source / "big.png").write_bytes(big)
    result = write_shards(ImageFolderSource(source, captions=False), tmp_path / "out")
    assert result.total_samples == 2
    assert result.skipped == [{"index": 0, "source": "big.png", "reason":
                               f"image too large: {BIG_SIDE} x {BIG_SIDE} = {BIG_SIDE**2} pixels, "
                               f"over the cap of {DEFAULT_MAX_PIXELS} (max_pixels)"}]  # fmt: skip


def test_the_pixel_cap_counts_what_a_jpeg_decodes_to_after_draft(tmp_path, capsys):
    # 400 x 400 is 160,000 pixels; for a side of 16 a JPEG decodes at 1/8 scale, 2,500.
    write_tar(tmp_path / "00000.tar", [("000000000.jpg", _jpeg(400)),
                                       ("000000001.png", png_bytes(400, 400)),
                                       ("000000002.jpg", jpeg_bytes(2))])  # fmt: skip
    image = ImageConfig(size=16, max_pixels=5000)
    loader = _simclr(tmp_path, image=image)
    assert _keys(loader) == ["000000000", "000000002"]
    assert loader.skipped_total["oversized_image"] == 1
    # The same cap and side through inspect's flags: the same verdict, exit status 1.
    argv = ["data", "inspect", str(tmp_path), "--image-size", "16", "--max-pixels", "5000"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "1 problem\n" in out and "[000000001]: oversized_image" in out
    assert main(["data", "inspect", str(tmp_path)]) == 0  # default caps: all fine
    # The writer decodes in full, so its cap is on the full size; `data write` has it too.
    source = make_caption_folder(tmp_path / "src", 2, captions=False)  # 12 x 10 images
    save_image(source / "wide.png", size=(30, 10))
    out = tmp_path / "out"
    argv = ["data", "write", "--from", "images", "--input", str(source), "--out", str(out)]
    assert main([*argv, "--max-pixels", "200"]) == 0
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [(s["source"], s["reason"]) for s in skipped] == [
        ("wide.png", "image too large: 30 x 10 = 300 pixels, over the cap of 200 (max_pixels)")
    ]
    assert "skipped 1 unreadable samples" in capsys.readouterr().err


def test_caps_must_be_positive(shards):
    with pytest.raises(DataError, match="max_member_bytes must be a positive integer"):
        _simclr(shards, max_member_bytes=0)
    with pytest.raises(DataError, match="image.max_pixels must be a positive integer"):
        _simclr(shards, image=ImageConfig(size=16, max_pixels=-1))
    with pytest.raises(DataError, match="max_pixels must be a positive integer"):
        inspect_shards(shards, max_pixels=0)


def test_a_member_over_the_byte_cap_skips_its_sample(tmp_path, capsys):
    write_tar(tmp_path / "00000.tar", [("000000000.jpg", jpeg_bytes(0)),
                                       ("000000001.jpg", jpeg_bytes(1)),
                                       ("000000001.json", b"{}" + b" " * 3000),
                                       ("000000002.jpg", jpeg_bytes(2))])  # fmt: skip
    loader = _simclr(tmp_path, max_member_bytes=2048)
    assert _keys(loader) == ["000000000", "000000002"]
    assert loader.skipped_total["oversized_member"] == 1
    assert loader.skipped_total["missing_image"] == 0
    assert main(["data", "inspect", str(tmp_path), "--max-member-bytes", "2KiB"]) == 1
    out = capsys.readouterr().out
    assert "1 problem\n" in out and "[000000001]: oversized_member" in out


def test_a_pax_header_over_the_byte_cap_ends_its_shard(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        # Sample 1 is lost with the shard's end too: a sample is complete only once the
        # next one starts (WebDataset's grouping).
        for i, comment in enumerate(("", "", "x" * 4000, "")):
            data = jpeg_bytes(i)
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size, info.pax_headers = len(data), {"comment": comment} if comment else {}
            tar.addfile(info, io.BytesIO(data))
    loader = _simclr(tmp_path, max_member_bytes=2048)
    assert _keys(loader) == ["000000000"]
    assert loader.skipped_total["bad_shard"] == 1
    report = inspect_shards(tmp_path, max_member_bytes=2048)
    assert [p.kind for p in report.problems] == ["unreadable_tar"]
    assert "extended header of" in report.problems[0].detail


# Run in a process of its own, to read its peak resident memory (VmHWM, reset to the
# current size first) around one epoch of the loader.
_PEAK_SCRIPT = """
import json, sys
from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.transforms import ImageConfig

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

loader = ShardLoader(LoaderConfig(shards=sys.argv[1:], captions=False, batch_size=4,
                                  num_workers=0, image=ImageConfig(size=16),
                                  max_member_bytes=2**20))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
before = status("VmRSS:")
keys = [k.rsplit("/", 1)[1] for batch in loader for k in batch.keys]
print(json.dumps({"growth": status("VmHWM:") - before, "keys": keys,
                  "skipped": dict(loader.skipped_total)}))
"""


def test_a_big_member_of_a_gzip_tar_is_streamed_past_never_held(tmp_path):
    mib = 1 << 20
    sample = tar_member("000000000.jpg", jpeg_bytes(0))
    last = tar_member("000000002.jpg", jpeg_bytes(2))
    # 512 MiB of zeros in about 0.5 MB of gzip, as a member, then as a pax header.
    member = gzip_tar_with_zeros(tmp_path / "member.tar.gz", sample, "000000001.jpg",
                                 512 * mib, last)  # fmt: skip
    header = gzip_tar_with_zeros(tmp_path / "header.tar.gz", sample, "././@PaxHeader",
                                 512 * mib, last, kind=tarfile.XHDTYPE)  # fmt: skip
    assert member.stat().st_size < 2 * mib
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(member), str(header)],
                          capture_output=True, text=True, timeout=90, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["growth"] < 64 * mib, result  # the member alone is 512 MiB
    # The header's shard ends at the header, the sample before it unfinished.
    assert result["keys"] == ["member.tar.gz#000000000", "member.tar.gz#000000002"]
    assert result["skipped"]["oversized_member"] == 1
    assert result["skipped"]["bad_shard"] == 1
