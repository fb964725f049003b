"""The training input: shards -> per-rank batches, deterministic and resumable.

    loader = ShardLoader(LoaderConfig(shards="demo/train", task="clip", batch_size=256,
                                      tokenizer="demo/tokenizer.json"),
                         rank=rank, world_size=world_size)
    for batch in loader:            # one epoch (endless when resampled)
        ...
    state = loader.state_dict()     # with the checkpoint; load_state_dict() to resume

Stages, per DataLoader worker (one ``Slot`` of ranks x workers; see ``shard_plan``):
shard share for (seed, epoch) -> raw samples (``shard_stream``) -> block shuffle ->
skip to the resume position -> decode, resize, crop (uint8) and tokenize -> batch.
Samples that cannot be used (corrupt image, no image, no caption for CLIP) are skipped
and counted; each batch carries its worker's counts since the previous batch.

Resuming exactly: a worker's output depends only on (seed, epoch, slot) and how many raw
samples it has consumed (its *position*), which every batch reports. The loader keeps the
position of each worker for the batches actually handed out, and which worker is next in
the DataLoader's round robin. A restored loader restarts every worker at its position and
rotates the worker ids so that the round robin resumes at the same worker: the batches
that follow equal those of a run that never stopped.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.batch_buffers import BatchLayout, BatchPools, batch_pools
from data_pipeline.errors import DataError
from data_pipeline.inspect_shards import resolve_shards
from data_pipeline.metadata import SampleMetadata
from data_pipeline.shard_format import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS
from data_pipeline.shard_plan import Slot, epoch_share, mixing_order, resampled_shards
from data_pipeline.shard_stream import (
    RateLimitedWarnings,
    Source,
    block_shuffled,
    interleave,
    read_shard,
    source_samples,
)
from data_pipeline.transforms import CorruptImage, ImageConfig, as_nchw, check_decoder, decode_into

# Workers are forked after the tokenizer may have run its Rust thread pool in this
# process; the library then disables its parallelism with a warning. Say so up front:
# each worker tokenizes its own batches anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("clip", "simclr")
SKIP_KINDS = ("corrupt_image", "missing_image", "missing_caption", "bad_shard")
# Batch buffers each worker keeps for reuse (data_pipeline.batch_buffers) beyond its
# prefetched batches: the batch the consumer holds, the one it held before, the
# pin-memory thread's, and the one being filled.
POOL_SLACK = 4


@dataclass(frozen=True)
class LoaderConfig:
    shards: Any
    """A shard specification (folder, manifest, brace pattern, path, ``pipe:`` command,
    or a list of these), or a list of ``{"shards": spec, "weight": w}`` sources."""
    task: str = "clip"
    """``clip`` (image + tokenized caption) or ``simclr`` (image only)."""
    batch_size: int = 256
    """Samples per batch, per rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: read in the main process)."""
    seed: int = 0
    shuffle_block: int = 1000
    """Samples shuffled together (1: no shuffle)."""
    resampled: bool = False
    """Endless stream of shards drawn with replacement (no epochs)."""
    drop_last: bool = False
    """Drop each worker's last, short batch of an epoch."""
    image: ImageConfig = field(default_factory=ImageConfig)
    tokenizer: str | None = None
    """tokenizer.json for CLIP captions (``megabatch data tokenizer``)."""
    context_length: int = 77
    pin_memory: bool = True
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""


@dataclass
class Batch:
    """One worker's batch. ``images``, ``tokens`` and ``token_mask`` are views of one
    buffer that the worker reuses once all three are freed: ``clone()`` what you keep
    beyond the step (``torch.save`` of a view writes the whole buffer)."""

    images: torch.Tensor  # (B, 3, S, S) uint8, channels-last memory
    tokens: torch.Tensor | None  # (B, L) int64, CLIP
    token_mask: torch.Tensor | None  # (B, L) bool, CLIP
    keys: list[str]  # "url#key" of each sample
    meta: SampleMetadata  # meta[i]: sample i's .json member as a dict ({} without one),
    # parsed where it is first read
    worker: int  # logical worker that made the batch
    position: int  # raw samples that worker had consumed after this batch
    epoch: int
    skipped: dict[str, int]  # samples/shards that worker skipped since its previous batch
    lease: tuple[int, int, int] | None = None  # (pools token, DataLoader worker, index) of
    # the buffer holding the tensors, returned to its pool once they are freed

    def __len__(self) -> int:
        return len(self.keys)

    def _map(self, fn) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("images", "tokens", "token_mask"):
            if values[name] is not None:
                values[name] = fn(values[name])
        return Batch(**values)

    def pin_memory(self) -> Batch:  # called by the DataLoader's pinning thread
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = True) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def __reduce_ex__(self, protocol):
        # From a DataLoader worker to the main process, a batch in a pooled buffer travels
        # as the buffer's number: the main process has that memory mapped already.
        if self.lease is not None and get_worker_info() is not None:
            pools = batch_pools(self.lease[0])
            if pools is not None:
                values = {f.name: getattr(self, f.name) for f in fields(self)}
                for name in ("images", "tokens", "token_mask"):
                    del values[name]
                return _pooled_batch, (len(self), values)
        return super().__reduce_ex__(protocol)


def _pooled_batch(n: int, values: dict) -> Batch:
    """A pooled batch arriving in the main process: views of its buffer's memory, over a
    storage of their own."""
    token, worker, index = values["lease"]
    pools = batch_pools(token)
    if pools is None:
        raise DataError("a batch arrived after its loader's epoch had ended")
    views = pools.views(worker, index)
    tokens = None if views.tokens is None else views.tokens[:n]
    mask = None if views.mask is None else views.mask[:n]
    return Batch(as_nchw(views.images[:n]), tokens, mask, **values)


# --------------------------------------------------------------------------- sources
def resolve_sources(spec) -> list[Source]:
    """Resolve a specification to sources; an error if it matches no shard at all."""
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


def _resolve_one(spec, weight: float) -> Source:
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if any(str(item).startswith("pipe:") for item in items):
        from braceexpand import braceexpand

        urls = tuple(u for item in items for u in braceexpand(str(item)))
        return Source(urls, (None,) * len(urls), weight)
    shard_set = resolve_shards(spec)
    present = [p for p in shard_set.paths if p.is_file()]
    if not present:
        raise DataError(f"shard specification {spec!r} matches no existing shard")
    return Source(tuple(str(p) for p in shard_set.paths), tuple(shard_set.expected_samples), weight)


# --------------------------------------------------------------------------- workers
class _ShardBatches(IterableDataset):
    """What one DataLoader worker runs: its slot's batches for one epoch."""

    def __init__(self, config, sources, rank, world_size, epoch, positions, rotation, tokenizer,
                 pools):  # fmt: skip
        super().__init__()
        self.config, self.sources, self.tokenizer = config, sources, tokenizer
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.positions, self.rotation = positions, rotation
        self.pools = pools  # BatchPools: every worker's reusable batch buffers

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % num_workers  # logical id
        slot = Slot(self.rank, self.world_size, worker, num_workers)
        position = self.positions[worker]
        warn, skipped = RateLimitedWarnings(), Counter()
        raw = self._raw_samples(slot, position, warn, skipped)
        yield from self._batches(raw, worker, position, warn, skipped, info.id if info else 0)

    def _raw_samples(self, slot, position, warn, skipped) -> Iterator[dict]:
        cfg, block = self.config, max(1, self.config.shuffle_block)
        first_block, drop = divmod(position, block)
        start = first_block * block  # unshuffled samples before the resumed block
        if cfg.resampled:
            draws = resampled_shards([len(s.urls) for s in self.sources],
                                     [s.weight for s in self.sources], cfg.seed, slot)  # fmt: skip
            samples = self._resampled(draws, warn, skipped)
            samples = islice(samples, start, None)
        elif len(self.sources) == 1:
            (source,) = self.sources
            share = epoch_share(len(source.urls), cfg.seed, self.epoch, slot)
            samples = source_samples(source, share.shards, share.stride, share.offset,
                                     start, warn, skipped)  # fmt: skip
        else:  # several weighted sources: replayed from the start (counts not simulated)
            streams = []
            for i, source in enumerate(self.sources):
                share = epoch_share(len(source.urls), cfg.seed, self.epoch, slot, source=i)
                streams.append(source_samples(source, share.shards, share.stride,
                                              share.offset, 0, warn, skipped))  # fmt: skip
            choices = mixing_order([s.weight for s in self.sources], cfg.seed, self.epoch, slot)
            samples = islice(interleave(streams, choices), start, None)
        return block_shuffled(samples, block, first_block, drop,
                              (cfg.seed, self.epoch, slot.index))  # fmt: skip

    def _resampled(self, draws, warn, skipped) -> Iterator[dict]:
        for source, shard in draws:
            src = self.sources[source]
            yield from read_shard(src.urls[shard], warn, skipped, src.counts[shard])

    def _batches(self, raw, worker, position, warn, skipped, row) -> Iterator[Batch]:
        cfg, pools = self.config, self.pools
        clip = cfg.task == "clip"
        index, buffer = pools.take(row)
        slots = pools.layout.views(buffer).images.numpy()  # decode writes in place
        captions, keys, meta = [], [], []
        for sample in raw:
            position += 1
            caption = self._decode_into(sample, slots[len(keys)], clip, warn, skipped)
            if caption is None:
                continue
            captions.append(caption)
            keys.append(f"{sample.get('__url__', '')}#{sample['__key__']}")
            meta.append(sample.get("json"))
            if len(keys) == cfg.batch_size:
                yield self._collate(row, index, buffer, captions, keys, meta, worker, position,
                                    skipped)  # fmt: skip
                index, buffer = pools.take(row)
                slots = pools.layout.views(buffer).images.numpy()
                captions, keys, meta = [], [], []
        if keys and not cfg.drop_last:
            yield self._collate(row, index, buffer, captions, keys, meta, worker, position,
                                skipped)  # fmt: skip

    def _decode_into(self, sample, slot, clip, warn, skipped) -> str | None:
        """Decode the sample's image into ``slot``; its caption ("" for SimCLR), or None
        when the sample is skipped (counted and warned)."""
        image_ext = next((e for e in sample if e in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            skipped["missing_image"] += 1
            warn("missing_image", f"{_where(sample)}: no image member, sample skipped")
            return None
        caption = ""
        if clip:
            caption_ext = next((e for e in sample if e in CAPTION_EXTENSIONS), None)
            raw_caption = sample[caption_ext] if caption_ext else b""
            caption = raw_caption.decode("utf-8", errors="replace").strip()
            if not caption:
                skipped["missing_caption"] += 1
                warn("missing_caption", f"{_where(sample)}: no caption, sample skipped")
                return None
        try:
            decode_into(sample[image_ext], slot, self.config.image.decoder)
        except CorruptImage as exc:
            skipped["corrupt_image"] += 1
            warn("corrupt_image",
                 f"{_where(sample)}: image does not decode ({exc}), sample skipped")  # fmt: skip
            return None
        return caption

    def _collate(self, row, index, buffer, captions, keys, meta, worker, position,
                 skipped) -> Batch:  # fmt: skip
        counts = {kind: skipped[kind] for kind in SKIP_KINDS}
        skipped.clear()
        lease = None
        if index >= 0:  # pooled: out until the consumer frees it (BatchPools.release_on_free)
            self.pools.lend(row, index)
            lease = (self.pools.token, row, index)
            # A storage of the batch's own over the buffer: in the main process (no
            # workers), its freeing is what says the consumer let go.
            views = self.pools.views(row, index)
        else:  # a one-off buffer, travelling the DataLoader's ordinary way
            views = self.pools.layout.views(buffer)
        n = len(keys)
        tokens = mask = None
        if views.tokens is not None:
            tokens, mask = views.tokens[:n], views.mask[:n]
            self.tokenizer.encode_into(captions, tokens.numpy(), mask.numpy())
        return Batch(as_nchw(views.images[:n]), tokens, mask, keys, SampleMetadata(meta), worker,
                     position, self.epoch, counts, lease)  # fmt: skip


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}"


# --------------------------------------------------------------------------- main process
class ShardLoader:
    """Iterating gives one epoch of this rank's batches (endless when resampled)."""

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1):
        if config.task not in TASKS:
            raise DataError(f"task must be one of {', '.join(TASKS)}, got {config.task!r}")
        if config.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {config.batch_size}")
        try:
            check_decoder(config.image.decoder)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self.config, self.rank, self.world_size = config, rank, world_size
        self.sources = resolve_sources(config.shards)
        self.tokenizer = None
        if config.task == "clip":
            if config.tokenizer is None:
                raise DataError(
                    "task 'clip' needs a tokenizer (build one with `megabatch data tokenizer`)"
                )
            from data_pipeline.tokenizer import CaptionTokenizer

            self.tokenizer = CaptionTokenizer.load(config.tokenizer, config.context_length)
        self.epoch = 0
        self.positions = [0] * self._workers
        self.rotation = 0
        self.skipped_total: Counter[str] = Counter()

    @property
    def _workers(self) -> int:
        return max(1, self.config.num_workers)

    def __iter__(self) -> Iterator[Batch]:
        cfg = self.config
        workers = cfg.num_workers
        layout = BatchLayout(cfg.batch_size, cfg.image.load_size or cfg.image.size,
                             cfg.context_length if cfg.task == "clip" else 0)  # fmt: skip
        capacity = (cfg.prefetch_factor if workers > 0 else 0) + POOL_SLACK
        pools = BatchPools(self._workers, capacity, layout, shared=workers > 0)
        dataset = _ShardBatches(cfg, self.sources, self.rank, self.world_size, self.epoch,
                                list(self.positions), self.rotation, self.tokenizer,
                                pools)  # fmt: skip
        loader = DataLoader(
            dataset,
            batch_size=None,  # workers yield whole batches
            num_workers=workers,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        )
        for batch in loader:
            if batch.lease is not None:  # the worker may reuse the buffer once it is freed
                pools.release_on_free(batch.images, *batch.lease[1:])
            self.positions[batch.worker] = batch.position
            self.rotation = (batch.worker + 1) % self._workers
            self.skipped_total.update(batch.skipped)
            yield batch
        if not cfg.resampled:
            self.epoch += 1
            self.positions = [0] * self._workers
            self.rotation = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "positions": list(self.positions),
            "rotation": self.rotation,
            "skipped_total": dict(self.skipped_total),
            "seed": self.config.seed,
            "num_workers": self._workers,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_workers", "world_size"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise DataError(
                    f"cannot resume the data position exactly: the checkpoint has {key}="
                    f"{state[key]}, this run has {mine}"
                )
        self.epoch = int(state["epoch"])
        self.positions = [int(p) for p in state["positions"]]
        self.rotation = int(state["rotation"])
        self.skipped_total = Counter(state["skipped_total"])
