"""Small real shard sets for reader tests: uncompressed tars in img2dataset's layout
(KEY.jpg, KEY.txt, KEY.json), written with tarfile and PIL, independent of the writer
under test elsewhere. Sample i's image is a flat colour derived from i and its caption
names i, so tests can tell samples apart by content."""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image

# The reader tests' shard set (conftest.py's `shards`): 10 shards of 13, the last short.
READER_SAMPLES = 120
READER_SHARD_SIZE = 13


def jpeg_bytes(i: int, size: int = 24) -> bytes:
    colour = ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)
    buf = io.BytesIO()
    Image.new("RGB", (size + i % 5, size), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    folder: Path,
    num_samples: int,
    per_shard: int,
    *,
    manifest: bool = True,
    corrupt: frozenset[int] = frozenset(),
    no_caption: frozenset[int] = frozenset(),
    bad_caption: frozenset[int] = frozenset(),
    start: int = 0,
) -> list[Path]:
    """Shards 00000.tar, ... of ``per_shard`` samples; keys are global sample indices."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, entries = [], []
    for shard, first in enumerate(range(start, start + num_samples, per_shard)):
        path = folder / f"{shard:05d}.tar"
        indices = range(first, min(first + per_shard, start + num_samples))
        with tarfile.open(path, "w") as tar:
            for i in indices:
                key = f"{i:09d}"
                image = b"\xff\xd8 not a jpeg" if i in corrupt else jpeg_bytes(i)
                _add(tar, f"{key}.jpg", image)
                if i not in no_caption:
                    caption = f"a photo of sample {i}".encode()
                    _add(tar, f"{key}.txt", caption + b" \xff" if i in bad_caption else caption)
                _add(tar, f"{key}.json", json.dumps({"index": i}).encode())
        paths.append(path)
        entries.append({"name": path.name, "samples": len(indices)})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return paths


def captions(num_samples: int) -> list[str]:
    return [f"a photo of sample {i}" for i in range(num_samples)]


def png_bytes(width: int, height: int) -> bytes:
    """A valid black PNG of any size, small and quick to make: 1 bit a pixel, written by
    hand (PIL would hold the whole image). 12000 x 12000 is 420 KB."""
    row = b"\0" * (1 + -(-width // 8))  # filter byte, then the row's bits
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    idat = zlib.compress(row * height, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tar_member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One tar member's bytes: its ustar header and its data, padded to 512 bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def gzip_tar_with_zeros(
    path: Path, before: bytes, name: str, size: int, after: bytes, kind: bytes = tarfile.REGTYPE
) -> Path:
    """A gzip'd tar: the tar bytes ``before``, a member ``name`` of ``size`` zero bytes
    (a multiple of 1 MiB; ``kind`` its header type), the tar bytes ``after`` and the end
    of the archive, in one gzip stream (what tarfile and WebDataset read in one piece).
    Quick to make at any size: after a full flush, deflate's output for one MiB of zeros
    is the same every time (about 1 KB), so it is compressed once and written size/1MiB
    times; only the CRC runs over every byte."""
    mib = 1 << 20
    if size % mib:
        raise ValueError("size must be a multiple of 1 MiB")
    header = tarfile.TarInfo(name)
    header.size, header.type = size, kind
    zeros = bytes(mib)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    crc, length = 0, 0
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header, mtime 0

        def put(data: bytes) -> bytes:
            nonlocal crc, length
            crc, length = zlib.crc32(data, crc), length + len(data)
            block = deflate.compress(data) + deflate.flush(zlib.Z_FULL_FLUSH)
            f.write(block)
            return block

        put(before + header.tobuf(format=tarfile.USTAR_FORMAT))
        block = put(zeros)
        for _ in range(size // mib - 1):
            f.write(block)
            crc = zlib.crc32(zeros, crc)
        length += size - mib
        put(after + b"\0" * 1024)  # the end-of-archive marker
        f.write(deflate.flush() + struct.pack("<II", crc, length & 0xFFFFFFFF))
    return path
