"""Raw samples out of tar shards, in a slot's deterministic order, with a cheap way to
start part-way (resuming). A raw sample is WebDataset's dict: ``__key__``, ``__url__``
and one ``bytes`` entry per member extension (``jpg``, ``txt``, ``json``, ...), members
grouped by key the way WebDataset groups them. A sample with a member over the member
cap (``megabatch.data_pipeline.limits``) has no entry for it and instead ``OVERSIZED``, saying
which member: the loader skips such a sample as a whole.

Bad shards (missing, unreadable, truncated) end early: the samples read so far count,
the rest of that shard is skipped and the event is counted; the stream goes on.

What is opened: a URL that starts with ``pipe:`` runs its command through WebDataset's
``gopen``; anything else is opened as a file, never through ``gopen``. Only a
specification the user wrote may be a ``pipe:`` URL: the resolver turns every path that
comes from a manifest or a folder listing into an absolute path first, so a shard named
``pipe:CMD`` is a file of that name, not a command (``shard_specs.resolve_sources``).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import BinaryIO

from megabatch.data_pipeline.limits import DEFAULT_MAX_MEMBER_BYTES
from megabatch.data_pipeline.read.shard_plan import block_permutation
from megabatch.data_pipeline.shard_format import split_member_name
from megabatch.data_pipeline.shard_specs import PIPE_PREFIX, ShardSource
from megabatch.data_pipeline.tar_members import READ_ERRORS, tar_members

log = logging.getLogger("megabatch.data")

OVERSIZED = "__oversized__"
"""The key of a raw sample that had a member over the cap: "NAME (SIZE bytes)"."""
# What reading a broken shard raises: a broken tar's errors, a duplicate member name
# (ValueError, as a path with a NUL byte).
SHARD_ERRORS = (*READ_ERRORS, ValueError)
# WebDataset's metadata members (``__key__``-like names), which it skips too.
_META_MEMBER_RE = re.compile(r"__[^/]*__($|/)")


class RateLimitedWarnings:
    """Warn about bad data without flooding the log: the first few of each kind, then at
    most one line per kind every ``interval_s`` seconds, with the count so far."""

    def __init__(self, first: int = 3, interval_s: float = 30.0):
        self.first, self.interval_s = first, interval_s
        self.counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        n, now = self.counts[kind], time.monotonic()
        if n <= self.first or now - self._last.get(kind, 0.0) >= self.interval_s:
            self._last[kind] = now
            log.warning("%s (%s #%d)", message, kind, n)


def open_shard(url: str) -> BinaryIO:
    """A ``pipe:`` URL's command output, or the file at path ``url``."""
    if url.startswith(PIPE_PREFIX):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb")


def read_shard(
    url: str,
    warn: RateLimitedWarnings,
    skipped: Counter,
    expected: int | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[dict]:
    """Every sample of one shard; a shard that fails part-way ends there, counted. A tar
    cut at a member boundary reads as a shorter, valid tar: with the manifest's
    ``expected`` count, that shortfall is caught and counted too. Members over
    ``max_member_bytes`` are streamed past unread (see ``OVERSIZED``)."""
    read = 0
    try:
        with open_shard(url) as stream:
            for sample in _samples(tar_members(stream, max_member_bytes), url):
                read += 1
                yield sample
    except SHARD_ERRORS as exc:
        skipped["bad_shard"] += 1
        warn("bad_shard", f"shard {url} unreadable or truncated, rest skipped: {exc}")
        return
    if expected is not None and read < expected:
        skipped["bad_shard"] += 1
        warn("bad_shard", f"shard {url} truncated: {read} of {expected} samples")


def _samples(members: Iterator[tuple[str, bytes | None, int]], url: str) -> Iterator[dict]:
    """Consecutive members with the same key -> one sample (WebDataset's grouping: the
    key is the name up to the first dot of its file name, the extension lower-cased)."""
    sample: dict | None = None
    for name, data, size in members:
        parts = None if _META_MEMBER_RE.match(name) else split_member_name(name)
        if parts is None:
            continue
        key, ext = parts
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{name}: duplicate member name in the shard")
        if data is None:
            sample[OVERSIZED] = f"{name} ({size} bytes)"
        else:
            sample[ext] = data
    if sample is not None:
        yield sample


def source_samples(
    source: ShardSource,
    shard_indices: Iterable[int],
    stride: int,
    offset: int,
    skip: int,
    warn: RateLimitedWarnings,
    skipped: Counter,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[dict]:
    """The samples of ``shard_indices`` (in that order) whose running index i has
    i % stride == offset, after dropping the first ``skip`` such samples. Shards whose
    sample count is known are skipped without being opened."""
    index = 0  # running index over the shards' samples, kept or not
    to_skip = skip * stride  # the skip-th kept sample sits at index skip * stride + offset
    for shard in shard_indices:
        count = source.counts[shard]
        if count is not None and index + count <= to_skip:
            index += count
            continue
        for sample in read_shard(source.urls[shard], warn, skipped, count, max_member_bytes):
            if index >= to_skip and index % stride == offset:
                yield sample
            index += 1


def block_shuffled(
    samples: Iterator[dict], block: int, first_block: int, drop: int, key: tuple[int, ...]
) -> Iterator[dict]:
    """Shuffle within consecutive blocks of ``block`` samples, block b permuted by
    ``block_permutation(..., b)``. ``samples`` starts at block ``first_block``; the first
    ``drop`` outputs of that block are dropped (resuming part-way through it).

    Blocks rather than a rolling buffer: the order of block b depends on nothing before
    it, so a resumed stream needs only the samples from block b on."""
    if block == 1 and drop == 0:  # no shuffle: skip drawing a permutation per sample
        yield from samples
        return
    seed, epoch, slot = key[0], key[1], key[2]
    b = first_block
    while True:
        chunk = [s for _, s in zip(range(block), samples, strict=False)]
        if not chunk:
            return
        order = block_permutation(len(chunk), seed, epoch, slot, b)
        for i in order[drop:]:
            yield chunk[i]
        drop, b = 0, b + 1


def interleave(streams: Sequence[Iterator[dict]], choices: Iterator[int]) -> Iterator[dict]:
    """Take the next sample from ``streams[c]`` for each c in ``choices``; a choice that
    lands on an exhausted stream moves on to the next live one, cyclically."""
    live = [True] * len(streams)
    while any(live):
        c = next(choices)
        while not live[c]:
            c = (c + 1) % len(streams)
        try:
            yield next(streams[c])
        except StopIteration:
            live[c] = False
