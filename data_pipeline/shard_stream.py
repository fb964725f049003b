"""Raw samples out of tar shards, in a slot's deterministic order, with a cheap way to
start part-way (resuming). A raw sample is WebDataset's dict: ``__key__``, ``__url__``
and one ``bytes`` entry per member extension (``jpg``, ``txt``, ``json``, ...).

Bad shards (missing, unreadable, truncated) end early: the samples read so far count,
the rest of that shard is skipped and the event is counted; the stream goes on.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import webdataset as wds
from webdataset import tariterators

from data_pipeline.shard_plan import block_permutation

log = logging.getLogger("megabatch.data")


@dataclass(frozen=True)
class Source:
    """One resolved shard source: URLs (local paths or ``pipe:`` commands), each shard's
    sample count where a manifest gives it (None otherwise), and its mixing weight."""

    urls: tuple[str, ...]
    counts: tuple[int | None, ...]
    weight: float = 1.0

    @property
    def counts_known(self) -> bool:
        return all(c is not None for c in self.counts)


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


def read_shard(
    url: str, warn: RateLimitedWarnings, skipped: Counter, expected: int | None = None
) -> Iterator[dict]:
    """Every sample of one shard; a shard that fails part-way ends there, counted. A tar
    cut at a member boundary reads as a shorter, valid tar: with the manifest's
    ``expected`` count, that shortfall is caught and counted too."""
    read = 0
    try:
        with wds.gopen(url, "rb") as stream:
            members = tariterators.tar_file_iterator(stream)  # {fname, data} per member
            named = ({**member, "__url__": url} for member in members)
            for sample in tariterators.group_by_keys(named):
                read += 1
                yield sample
    except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
        skipped["bad_shard"] += 1
        warn("bad_shard", f"shard {url} unreadable or truncated, rest skipped: {exc}")
        return
    if expected is not None and read < expected:
        skipped["bad_shard"] += 1
        warn("bad_shard", f"shard {url} truncated: {read} of {expected} samples")


def source_samples(
    source: Source,
    shard_indices: Iterable[int],
    stride: int,
    offset: int,
    skip: int,
    warn: RateLimitedWarnings,
    skipped: Counter,
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
        for sample in read_shard(source.urls[shard], warn, skipped, count):
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
