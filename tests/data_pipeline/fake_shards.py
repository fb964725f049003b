"""Small real shard sets for reader tests: uncompressed tars in img2dataset's layout
(KEY.jpg, KEY.txt, KEY.json), written with tarfile and PIL, independent of the writer
under test elsewhere. Sample i's image is a flat colour derived from i and its caption
names i, so tests can tell samples apart by content."""

import io
import json
import tarfile
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
                    _add(tar, f"{key}.txt", f"a photo of sample {i}".encode())
                _add(tar, f"{key}.json", json.dumps({"index": i}).encode())
        paths.append(path)
        entries.append({"name": path.name, "samples": len(indices)})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return paths


def captions(num_samples: int) -> list[str]:
    return [f"a photo of sample {i}" for i in range(num_samples)]
