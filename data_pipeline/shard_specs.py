"""Shard specifications: what a user writes to name shards, and what it resolves to.

A specification is a folder (its ``manifest.json``, else every ``*.tar`` in it, sorted:
img2dataset's folders read unchanged), a manifest file, a brace pattern
(``data/{00000..00009}.tar``), one tar path, a ``pipe:`` command (one per shard after
brace expansion), or a list of these; for the loader also a list of weighted sources,
``[{"shards": spec, "weight": w}, ...]``.

- ``resolve_shards``: a specification without ``pipe:`` commands -> ``ShardSet`` (paths,
  the manifests' sample counts). What ``megabatch data inspect`` checks.
- ``resolve_sources``: any specification -> ``ShardSource`` list (absolute paths or
  ``pipe:`` commands, counts, weights). What the loader, ``megabatch data tokenizer``
  and the trainer's preflight read.

Only a string the user wrote that starts with ``pipe:`` is a command: every shard a
manifest, a folder listing or a pattern names is a path, and ``resolve_sources`` makes
it absolute so that no opener can read it as anything else (``pipe:CMD`` from a
manifest in the current folder would otherwise reach the opener as the bare name).
Manifests are read through ``manifest.read_manifest``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.manifest import MANIFEST_NAME, read_manifest

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]
PIPE_PREFIX = "pipe:"


@dataclass
class ShardSet:
    """A resolved shard specification."""

    paths: list[Path]
    expected_samples: list[int | None]
    """Per shard, the manifest's sample count (None without a manifest)."""
    manifests: list[Path] = field(default_factory=list)
    has_captions: bool | None = None
    """The manifests' word on captions; None without manifests or if they disagree."""


@dataclass(frozen=True)
class ShardSource:
    """One weighted set of shards, resolved: URLs (absolute paths, or ``pipe:`` commands
    the user wrote), each shard's sample count where a manifest gives it (None
    otherwise), and its mixing weight. What the loader's stream reads."""

    urls: tuple[str, ...]
    counts: tuple[int | None, ...]
    weight: float = 1.0

    def __post_init__(self) -> None:
        # A relative path could read as a URL ("pipe:...", "-" for stdin) to an opener.
        for url in self.urls:
            if not (url.startswith(PIPE_PREFIX) or os.path.isabs(url)):
                raise ValueError(f"shard path {url!r} is not absolute")

    @property
    def counts_known(self) -> bool:
        return all(c is not None for c in self.counts)


def resolve_shards(spec: ShardSpec) -> ShardSet:
    """Turn a specification into shard paths: a folder (its ``manifest.json``, or else
    every ``*.tar`` in it, sorted), a manifest file, a brace pattern
    (``data/{00000..00009}.tar``), one tar path, or a list of any of these (their shards
    in order). A folder, manifest or single path that does not exist, or a folder with no
    shards, raises ``DataError``; tars named by a pattern, list or manifest but missing
    are reported by the check."""
    if not isinstance(spec, str | os.PathLike):
        items = [os.fspath(item) for item in spec]
        if not items:
            raise DataError("no shards given")
        if len(items) == 1:
            return resolve_shards(items[0])
        parts = [
            resolve_shards(item)
            if os.path.isdir(item) or item.endswith(".json")
            else _without_counts(_expand(item))
            for item in items
        ]
        return _concat(parts)

    text = os.fspath(spec)
    if "{" in text:
        return _without_counts(_expand(text))
    path = Path(text)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _from_manifest(path / MANIFEST_NAME)
        # img2dataset's folders also hold NNNNN_stats.json and NNNNN.parquet: not shards.
        tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not tars:
            raise DataError(f"no {MANIFEST_NAME} and no .tar files in {path}")
        return _without_counts(tars)
    if not path.exists():
        raise DataError(f"no such file or folder: {path}")
    if path.suffix == ".json":
        return _from_manifest(path)
    return _without_counts([path])


def _without_counts(paths: list[Path]) -> ShardSet:
    return ShardSet(paths, [None] * len(paths))


def _concat(parts: list[ShardSet]) -> ShardSet:
    captions = {part.has_captions for part in parts}
    return ShardSet(
        paths=[path for part in parts for path in part.paths],
        expected_samples=[count for part in parts for count in part.expected_samples],
        manifests=[manifest for part in parts for manifest in part.manifests],
        has_captions=captions.pop() if len(captions) == 1 else None,
    )


def _expand(pattern: str) -> list[Path]:
    from braceexpand import braceexpand

    return [Path(item) for item in braceexpand(pattern)]


def _from_manifest(path: Path) -> ShardSet:
    manifest = read_manifest(path)
    # A name is a path relative to the manifest's folder, whatever it looks like:
    # "pipe:cmd" is a file of that name (resolve_sources makes it absolute).
    return ShardSet(
        paths=manifest.shard_paths,
        expected_samples=[shard.samples for shard in manifest.shards],
        manifests=[path],
        has_captions=manifest.has_captions,
    )


def resolve_sources(spec) -> list[ShardSource]:
    """Resolve a specification, or a list of ``{"shards": spec, "weight": w}`` sources,
    to sources; an error if one matches no existing shard at all."""
    if isinstance(spec, Sequence) and spec and all(isinstance(s, dict) for s in spec):
        entries = [(s["shards"], float(s.get("weight", 1.0))) for s in spec]
    else:
        entries = [(spec, 1.0)]
    sources = []
    for shards, weight in entries:
        if weight <= 0:
            raise DataError(f"source weight must be > 0, got {weight} for {shards}")
        sources.append(_resolve_one(shards, weight))
    return sources


def _resolve_one(spec, weight: float) -> ShardSource:
    """Only a string the user wrote that starts with ``pipe:`` is a command; every shard
    a manifest, a folder listing or a pattern names is a path, made absolute here."""
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not any(_is_pipe(item) for item in items):
        shard_set = resolve_shards(spec)
        present = [p for p in shard_set.paths if p.is_file()]
        if not present:
            raise DataError(f"shard specification {spec!r} matches no existing shard")
        paths = tuple(str(p.absolute()) for p in shard_set.paths)
        return ShardSource(paths, tuple(shard_set.expected_samples), weight)
    from braceexpand import braceexpand

    urls: list[str] = []
    counts: list[int | None] = []
    for item in items:
        if _is_pipe(item):  # one command per shard after brace expansion
            expanded = list(braceexpand(item))
            urls += expanded
            counts += [None] * len(expanded)
        else:
            part = _resolve_one(item, weight)
            urls += part.urls
            counts += part.counts
    return ShardSource(tuple(urls), tuple(counts), weight)


def _is_pipe(item) -> bool:
    return isinstance(item, str) and item.startswith(PIPE_PREFIX)
