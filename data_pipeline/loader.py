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

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.inspect_shards import resolve_shards
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
from data_pipeline.transforms import (
    CorruptImage,
    ImageConfig,
    as_nchw,
    decode_resize_crop,
    new_image_batch,
)

# Workers are forked after the tokenizer may have run its Rust thread pool in this
# process; the library then disables its parallelism with a warning. Say so up front:
# each worker tokenizes its own batches anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("clip", "simclr")
SKIP_KINDS = ("corrupt_image", "missing_image", "missing_caption", "bad_shard")


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
    images: torch.Tensor  # (B, 3, S, S) uint8, channels-last memory
    tokens: torch.Tensor | None  # (B, L) int64, CLIP
    token_mask: torch.Tensor | None  # (B, L) bool, CLIP
    keys: list[str]  # "url#key" of each sample
    meta: list[dict]  # each sample's .json member, parsed ({} without one): labels etc.
    worker: int  # logical worker that made the batch
    position: int  # raw samples that worker had consumed after this batch
    epoch: int
    skipped: dict[str, int]  # samples/shards that worker skipped since its previous batch

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

    def __init__(self, config, sources, rank, world_size, epoch, positions, rotation, tokenizer):
        super().__init__()
        self.config, self.sources, self.tokenizer = config, sources, tokenizer
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.positions, self.rotation = positions, rotation

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % num_workers  # logical id
        slot = Slot(self.rank, self.world_size, worker, num_workers)
        position = self.positions[worker]
        warn, skipped = RateLimitedWarnings(), Counter()
        raw = self._raw_samples(slot, position, warn, skipped)
        yield from self._batches(raw, worker, position, warn, skipped)

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

    def _batches(self, raw, worker, position, warn, skipped) -> Iterator[Batch]:
        cfg = self.config
        side = cfg.image.load_size or cfg.image.size
        in_worker = get_worker_info() is not None
        images = new_image_batch(cfg.batch_size, side, shared=in_worker)
        captions, keys, meta = [], [], []
        for sample in raw:
            position += 1
            decoded = self._decode(sample, side, warn, skipped)
            if decoded is None:
                continue
            images.numpy()[len(keys)] = decoded[0]  # (S, S, 3) into the shared batch
            captions.append(decoded[1])
            keys.append(f"{sample.get('__url__', '')}#{sample['__key__']}")
            meta.append(_metadata(sample))
            if len(keys) == cfg.batch_size:
                yield self._collate(images, captions, keys, meta, worker, position, skipped)
                images = new_image_batch(cfg.batch_size, side, shared=in_worker)
                captions, keys, meta = [], [], []
        if keys and not cfg.drop_last:
            n = len(keys)
            yield self._collate(images[:n], captions, keys, meta, worker, position, skipped)

    def _decode(self, sample, side, warn, skipped):
        where = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
        image_ext = next((e for e in sample if e in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            skipped["missing_image"] += 1
            warn("missing_image", f"{where}: no image member, sample skipped")
            return None
        caption = None
        if self.config.task == "clip":
            caption_ext = next((e for e in sample if e in CAPTION_EXTENSIONS), None)
            raw_caption = sample[caption_ext] if caption_ext else b""
            caption = raw_caption.decode("utf-8", errors="replace").strip()
            if not caption:
                skipped["missing_caption"] += 1
                warn("missing_caption", f"{where}: no caption, sample skipped")
                return None
        try:
            image = decode_resize_crop(sample[image_ext], side)
        except CorruptImage as exc:
            skipped["corrupt_image"] += 1
            warn("corrupt_image", f"{where}: image does not decode ({exc}), sample skipped")
            return None
        return image, caption

    def _collate(self, images, captions, keys, meta, worker, position, skipped) -> Batch:
        tokens = mask = None
        if self.config.task == "clip":
            tokens, mask = self.tokenizer(captions)
        counts = {kind: skipped[kind] for kind in SKIP_KINDS}
        skipped.clear()
        return Batch(
            as_nchw(images), tokens, mask, keys, meta, worker, position, self.epoch, counts
        )


def _metadata(sample: dict) -> dict:
    raw = sample.get("json")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}  # metadata is informational: a bad .json does not cost the sample
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- main process
class ShardLoader:
    """Iterating gives one epoch of this rank's batches (endless when resampled)."""

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1):
        if config.task not in TASKS:
            raise DataError(f"task must be one of {', '.join(TASKS)}, got {config.task!r}")
        if config.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {config.batch_size}")
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
        dataset = _ShardBatches(cfg, self.sources, self.rank, self.world_size, self.epoch,
                                list(self.positions), self.rotation, self.tokenizer)  # fmt: skip
        workers = cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,  # workers yield whole batches
            num_workers=workers,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        )
        for batch in loader:
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
