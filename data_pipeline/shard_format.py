"""The on-disk layout of a shard set, shared by the write side and the read side (the
manifest, ``manifest.json``, has a module of its own: ``manifest``).

A shard is an uncompressed tar holding, per sample, ``KEY.jpg``, ``KEY.txt`` (the
caption; absent for image-only data) and ``KEY.json`` (metadata): the layout img2dataset
writes and WebDataset reads. Shards are named ``00000.tar``, ``00001.tar``, ... and keys
are zero-padded running sample indices (9 digits, like img2dataset's default 5-digit
shard id + 4-digit index), so they sort in writing order and are unique across shards.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

SHARD_DIGITS = 5
KEY_DIGITS = 9
# Complete shards only: the writer's unfinished files end in PARTIAL_SUFFIX.
SHARD_NAME_RE = re.compile(rf"^(\d{{{SHARD_DIGITS},}})\.tar$")
PARTIAL_SUFFIX = ".partial"

# Member extensions, lower case, as WebDataset's decoders name them.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff"})
CAPTION_EXTENSIONS = frozenset({"txt", "text", "caption"})

# tar geometry (POSIX ustar): a 512-byte header per member, data padded to 512 bytes, two
# zero blocks at the end, and the whole archive padded to a 10 KiB record by Python's
# tarfile (and GNU tar).
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}.tar"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


_MEMBER_NAME_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/000000042.jpg"`` -> ``("dir/000000042", "jpg")``: the key is everything
    before the first dot of the file name (WebDataset's rule, so ``x.seg.png`` has key
    ``x`` and extension ``seg.png``). None for names without an extension."""
    match = _MEMBER_NAME_RE.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def tar_member_bytes(data_size: int) -> int:
    """Bytes one member of ``data_size`` bytes takes in the archive (header + padded data)."""
    return TAR_BLOCK + -(-data_size // TAR_BLOCK) * TAR_BLOCK


def tar_archive_bytes(members_bytes: int) -> int:
    """Size of the finished archive whose members take ``members_bytes`` in all."""
    return -(-(members_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file renamed into place, so that a
    reader (or a rerun after a crash) sees the old file or the complete new one."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
