"""``manifest.json``: the one file that describes a shard set, and its one owner.

The writer (``write.writer``, and through it ``write.demo``) writes it with
``write_manifest``, last, once every shard is in place; everything that reads it (the
spec resolver, ``shard_specs``, for the loader, the tokenizer and ``megabatch data
inspect``; the writer itself, to see that a folder already holds its finished set)
calls ``read_manifest``.

Fields (the writer writes them all; a reader needs only ``shards``)::

    format          "megabatch-shards"
    format_version  MANIFEST_VERSION
    split           "train", "val", or null
    source          the source's one-line description
    has_captions    whether every sample has a caption member
    total_samples   the samples of all shards
    shards          [{"name": "00000.tar", "samples": 10000, "bytes": ...}, ...]
    skipped         [{"index": ..., "source": ..., "reason": ...}, ...]
    fingerprint     what the shards' bytes depend on (the writer's resume check)

Versions: ``format_version`` says which of these layouts a file has. A reader accepts
the versions in ``SUPPORTED_VERSIONS`` and refuses any other (a newer writer's, or a
value that is not a version) with a one-line ``DataError`` naming the file, the version
found and the versions supported. A manifest without ``format_version`` is version 1,
the layout above, which every writer so far has written (a hand-written manifest, a
``shards`` list alone, reads as one). A JSON file whose ``format`` names another format,
or that has no ``shards`` list, is not a manifest.

Shard names are file names relative to the manifest's folder, whatever they look like
(``pipe:CMD`` is a file of that name: see ``shard_specs``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.shard_format import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "megabatch-shards"
MANIFEST_VERSION = 1
"""What ``write_manifest`` writes. Raise it (and add it to SUPPORTED_VERSIONS, with the
reading of the new layout) when the layout changes in a way an older reader would
misread."""
SUPPORTED_VERSIONS = (1,)
"""What ``read_manifest`` reads."""


@dataclass(frozen=True)
class ManifestShard:
    name: str
    """File name, relative to the manifest's folder."""
    samples: int | None
    """Sample count; None when the manifest does not say."""


@dataclass(frozen=True)
class Manifest:
    """A manifest as read (and checked) by ``read_manifest``."""

    path: Path
    version: int
    shards: tuple[ManifestShard, ...]
    has_captions: bool | None
    """The manifest's word on captions; None when it does not say."""
    data: dict[str, Any]
    """The whole JSON object, every field as written."""

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path.parent / shard.name for shard in self.shards]


def manifest_dict(
    *,
    split: str | None,
    source: str,
    has_captions: bool,
    shards: Sequence[dict[str, Any]],
    skipped: Sequence[dict[str, Any]],
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a finished write, as ``write_manifest`` writes it. ``shards``:
    ``{"name", "samples", "bytes"}`` per shard, in order."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "split": split,
        "source": source,
        "has_captions": has_captions,
        "total_samples": sum(shard["samples"] for shard in shards),
        "shards": [dict(shard) for shard in shards],
        "skipped": list(skipped),
        "fingerprint": fingerprint,
    }


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` (from ``manifest_dict``) to ``path`` atomically: a reader sees
    no manifest or the whole one."""
    atomic_write_json(Path(path), manifest)


def read_manifest(path: Path) -> Manifest:
    """Read and check the manifest at ``path``: one-line ``DataError`` for a file that
    cannot be read, is not a manifest, has a version this code does not read, or has a
    shard entry that is not a file name with an optional sample count."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    not_a_manifest = f"{path} is not a shard manifest (no 'shards' list of names)"
    if not isinstance(data, dict):
        raise DataError(not_a_manifest)
    fmt = data.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a shard manifest (format {fmt!r}, not {MANIFEST_FORMAT!r})")
    version = data.get("format_version", 1)
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise DataError(f"{path}: manifest format_version {version!r} is not supported (this "
                        f"version of megabatch reads format_version {supported})")  # fmt: skip
    try:
        names = [entry["name"] for entry in data["shards"]]
        counts = [entry.get("samples") for entry in data["shards"]]
    except (KeyError, TypeError, AttributeError):
        raise DataError(not_a_manifest) from None
    for i, (name, count) in enumerate(zip(names, counts, strict=True)):
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: shard {i}'s name is not a file name: {name!r}")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 0):  # fmt: skip
            raise DataError(f"{path}: shard {name!r} has a bad sample count: {count!r}")
    has_captions = data.get("has_captions")
    return Manifest(
        path=path,
        version=int(version),
        shards=tuple(ManifestShard(n, c) for n, c in zip(names, counts, strict=True)),
        has_captions=has_captions if isinstance(has_captions, bool) else None,
        data=data,
    )
