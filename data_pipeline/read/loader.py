"""The training input: shards -> per-rank batches, deterministic and resumable.

    tokenizer = CaptionTokenizer.load("demo/tokenizer.json")       # read.tokenizer
    loader = ShardLoader(LoaderConfig(shards="demo/train", batch_size=256),
                         rank=rank, world_size=world_size, tokenizer=tokenizer)
    for batch in loader:            # one epoch (endless when resampled)
        ...
    state = loader.state_dict()     # with the checkpoint; load_state_dict() to resume

The shard specification is resolved when the loader is built (``shard_specs``). Stages,
per DataLoader worker (one ``Slot`` of ranks x workers; see ``shard_plan``): shard share
for (seed, epoch) -> raw samples (``shard_stream``) -> block shuffle -> skip to the
resume position -> decode, resize, crop (uint8) and, with captions, tokenize -> batch.
The loader knows samples with captions (``LoaderConfig.captions``, tokenized with the
``CaptionTokenizer`` it is given) and samples without; what a training task makes of
them is the trainer's business.

Samples that cannot be used (see ``SKIP_KINDS``) are skipped and counted; each batch
carries its worker's counts since the previous batch, and each worker ends its epoch
with a summary (``_WorkerEnd``: the counts after its last batch, how many samples it
read and could use) that the loader takes in and does not yield. An epoch that gives
this rank no batch at all is a ``DataError`` saying why, not a silent empty loop; in
resampled mode a worker that draws many shards in a row without one usable sample
raises it instead (``_DryStreak``).

Signals: the workers ignore SIGTERM, SIGUSR1 and SIGUSR2 (``_leave_signals_to_the_rank``). A
scheduler that stops a job signals the whole process tree, and torch's own worker
handler would have the workers die first, taking the rank down with "DataLoader worker
killed by signal" before it could save. The workers still end with the loader's own
shutdown (a "done" event and a None in each index queue: at the end of an epoch, when
its iterator is dropped, and at exit, ``_stop_workers_at_exit``), and when the rank dies
the kernel kills them (``_die_with_the_rank``; torch's watchdog where that is not Linux).

Resuming exactly: a worker's output depends only on (seed, epoch, slot) and how many raw
samples it has consumed (its *position*), which every batch reports. The loader keeps the
position of each worker for the batches actually handed out, and which worker is next in
the DataLoader's round robin. A restored loader restarts every worker at its position and
rotates the worker ids so that the round robin resumes at the same worker: the batches
that follow equal those of a run that never stopped.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.limits import DEFAULT_MAX_MEMBER_BYTES, check_cap
from megabatch.data_pipeline.read.batch_buffers import BatchLayout, BatchPools, batch_pools
from megabatch.data_pipeline.read.metadata import SampleMetadata
from megabatch.data_pipeline.read.shard_plan import (
    Slot,
    epoch_share,
    mixing_order,
    resampled_shards,
)
from megabatch.data_pipeline.read.shard_stream import (
    OVERSIZED,
    RateLimitedWarnings,
    block_shuffled,
    interleave,
    read_shard,
    source_samples,
)
from megabatch.data_pipeline.read.transforms import (
    CorruptImage,
    ImageConfig,
    OversizedImage,
    as_nchw,
    check_decoder,
    decode_into,
)
from megabatch.data_pipeline.shard_format import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS
from megabatch.data_pipeline.shard_specs import resolve_sources

if TYPE_CHECKING:
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer

# Workers are forked after the tokenizer may have run its Rust thread pool in this
# process; the library then disables its parallelism with a warning. Say so up front:
# each worker tokenizes its own batches anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SKIP_KINDS = (
    "corrupt_image",  # the image does not decode
    "oversized_image",  # the image would decode to more than ImageConfig.max_pixels pixels
    "missing_image",  # no image member
    "missing_caption",  # captions=True: no caption, or an empty one
    "bad_caption",  # captions=True: the caption is not UTF-8
    "oversized_member",  # a member over LoaderConfig.max_member_bytes (left unread)
    "bad_shard",  # a shard missing, unreadable, or cut short (the rest of it is lost)
)
# Resampled mode: a worker that draws this many shards in a row (or twice the number of
# shards, if more) without one usable sample raises a DataError instead of drawing for
# ever.
DRY_DRAWS_MIN = 100
# What schedulers send the whole process tree to stop a job: the workers leave them to
# the rank (see the module's docstring).
RANK_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Batch buffers each worker keeps for reuse (read.batch_buffers) beyond its
# prefetched batches: the batch the consumer holds, the one it held before, the
# pin-memory thread's, and the one being filled.
POOL_SLACK = 4


@dataclass(frozen=True)
class LoaderConfig:
    shards: Any
    """A shard specification (folder, manifest, brace pattern, path, ``pipe:`` command,
    or a list of these), or a list of ``{"shards": spec, "weight": w}`` sources
    (``megabatch.data_pipeline.shard_specs``)."""
    captions: bool = True
    """Samples carry a caption, tokenized into ``tokens``/``token_mask`` (with the
    tokenizer given to ``ShardLoader``); a sample without one is skipped. False: images
    only (``tokens`` and ``token_mask`` are None)."""
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
    pin_memory: bool = True
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    """Bytes a tar member may hold; a bigger one is streamed past unread and its sample
    skipped (``oversized_member``). See ``megabatch.data_pipeline.limits``."""


@dataclass
class Batch:
    """One worker's batch. ``images``, ``tokens`` and ``token_mask`` are views of one
    buffer that the worker reuses once all three are freed: ``clone()`` what you keep
    beyond the step (``torch.save`` of a view writes the whole buffer)."""

    images: torch.Tensor  # (B, 3, S, S) uint8, channels-last memory
    tokens: torch.Tensor | None  # (B, L) int64, L the tokenizer's context; captions only
    token_mask: torch.Tensor | None  # (B, L) bool; captions only
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


@dataclass(frozen=True)
class _WorkerEnd:
    """A worker's last item of an epoch, taken in by the loader and not yielded."""

    worker: int  # logical worker
    position: int  # raw samples consumed at the end: the worker is done at this position
    read: int  # raw samples read this epoch (since the position it started from)
    usable: int  # of those, samples that decoded (in a batch, or in a dropped last one)
    skipped: dict[str, int]  # skips since the worker's last batch


@dataclass(frozen=True)
class _WorkerFailed:
    """A DataError in a worker, as an item: the loader raises it as it was, one line
    (raised in the worker, it would arrive wrapped in a traceback)."""

    message: str


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
        dry = _DryStreak(self._dry_draws_limit(), worker, self.rank)
        try:
            raw = self._raw_samples(slot, position, warn, skipped, dry)
            yield from self._batches(raw, worker, position, warn, skipped, dry,
                                     info.id if info else 0)  # fmt: skip
        except DataError as exc:
            yield _WorkerFailed(str(exc))

    def _dry_draws_limit(self) -> int:
        return max(DRY_DRAWS_MIN, 2 * sum(len(s.urls) for s in self.sources))

    def _raw_samples(self, slot, position, warn, skipped, dry) -> Iterator[dict]:
        cfg, block = self.config, max(1, self.config.shuffle_block)
        cap = cfg.max_member_bytes
        first_block, drop = divmod(position, block)
        start = first_block * block  # unshuffled samples before the resumed block
        if cfg.resampled:
            draws = resampled_shards([len(s.urls) for s in self.sources],
                                     [s.weight for s in self.sources], cfg.seed, slot)  # fmt: skip
            samples = self._resampled(draws, warn, skipped, dry)
            samples = islice(samples, start, None)
        elif len(self.sources) == 1:
            (source,) = self.sources
            share = epoch_share(len(source.urls), cfg.seed, self.epoch, slot)
            samples = source_samples(source, share.shards, share.stride, share.offset,
                                     start, warn, skipped, cap)  # fmt: skip
        else:  # several weighted sources: replayed from the start (counts not simulated)
            streams = []
            for i, source in enumerate(self.sources):
                share = epoch_share(len(source.urls), cfg.seed, self.epoch, slot, source=i)
                streams.append(source_samples(source, share.shards, share.stride,
                                              share.offset, 0, warn, skipped, cap))  # fmt: skip
            choices = mixing_order([s.weight for s in self.sources], cfg.seed, self.epoch, slot)
            samples = islice(interleave(streams, choices), start, None)
        return block_shuffled(samples, block, first_block, drop,
                              (cfg.seed, self.epoch, slot.index))  # fmt: skip

    def _resampled(self, draws, warn, skipped, dry) -> Iterator[dict]:
        """The endless stream of drawn shards' samples, each tagged with its draw's
        number (``__draw__``, for ``_DryStreak``); draws that give no sample at all (a
        missing or empty shard) count towards the dry streak here."""
        cap, empty = self.config.max_member_bytes, 0
        for draw, (source, shard) in enumerate(draws):
            src, sample = self.sources[source], None
            for sample in read_shard(src.urls[shard], warn, skipped, src.counts[shard], cap):
                sample["__draw__"] = draw
                yield sample
            empty = 0 if sample is not None else empty + 1
            if empty >= dry.limit:
                dry.fail(f"{empty} shards in a row gave no sample", skipped)

    def _batches(self, raw, worker, position, warn, skipped, dry, row) -> Iterator:
        """This worker's batches, then its ``_WorkerEnd``."""
        cfg, pools = self.config, self.pools
        index, buffer = pools.take(row)
        slots = pools.layout.views(buffer).images.numpy()  # decode writes in place
        captions, keys, meta = [], [], []
        start, usable = position, 0
        for sample in raw:
            position += 1
            caption = self._decode_into(sample, slots[len(keys)], warn, skipped)
            if caption is None:
                dry.unusable(sample, skipped)
                continue
            if dry.draws:
                dry.draws.clear()
            usable += 1
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
        counts = {kind: skipped[kind] for kind in SKIP_KINDS}
        yield _WorkerEnd(worker, position, position - start, usable, counts)

    def _decode_into(self, sample, slot, warn, skipped) -> str | None:
        """Decode the sample's image into ``slot``; its caption ("" without captions), or
        None when the sample is skipped (counted and warned)."""
        if OVERSIZED in sample:
            skipped["oversized_member"] += 1
            warn("oversized_member",
                 f"{_where(sample)}: member {sample[OVERSIZED]} is over the "
                 f"{self.config.max_member_bytes}-byte cap (max_member_bytes), sample skipped")  # fmt: skip
            return None
        image_ext = next((e for e in sample if e in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            skipped["missing_image"] += 1
            warn("missing_image", f"{_where(sample)}: no image member, sample skipped")
            return None
        caption = ""
        if self.config.captions:
            caption_ext = next((e for e in sample if e in CAPTION_EXTENSIONS), None)
            raw_caption = sample[caption_ext] if caption_ext else b""
            try:
                caption = raw_caption.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                skipped["bad_caption"] += 1
                warn("bad_caption",
                     f"{_where(sample)}: caption is not UTF-8 ({exc}), sample skipped")  # fmt: skip
                return None
            if not caption:
                skipped["missing_caption"] += 1
                warn("missing_caption", f"{_where(sample)}: no caption, sample skipped")
                return None
        image = self.config.image
        try:
            decode_into(sample[image_ext], slot, image.decoder, image.max_pixels)
        except OversizedImage as exc:
            skipped["oversized_image"] += 1
            warn("oversized_image",
                 f"{_where(sample)}: image too large ({exc}; max_pixels), sample skipped")  # fmt: skip
            return None
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


class _DryStreak:
    """Resampled mode's bound: the shard draws (``__draw__`` numbers) met since the last
    usable sample. Counted as distinct draws, not samples, because the block shuffle
    mixes the samples of up to ``shuffle_block`` samples' worth of draws; a usable
    sample empties the set (one truthiness test per sample). In epoch mode samples have
    no draw number and the set never holds more than None."""

    def __init__(self, limit: int, worker: int, rank: int):
        self.limit, self.worker, self.rank = limit, worker, rank
        self.draws: set[int | None] = set()

    def unusable(self, sample: dict, skipped: Counter) -> None:
        self.draws.add(sample.get("__draw__"))
        if len(self.draws) >= self.limit:
            self.fail(f"{len(self.draws)} shards in a row gave no usable sample", skipped)

    def fail(self, what: str, skipped: Counter) -> None:
        counts = _skip_counts(skipped)
        raise DataError(f"resampled shards: worker {self.worker} of rank {self.rank}: {what} "
                        f"(skips since its last batch: {counts}); is the data readable?")  # fmt: skip


def _skip_counts(counts) -> str:
    return ", ".join(f"{kind} {counts[kind]}" for kind in SKIP_KINDS if counts.get(kind)) or "none"


def _leave_signals_to_the_rank(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore SIGTERM, SIGUSR1 and SIGUSR2, which schedulers send
    to the whole process tree, so that the rank alone decides what to do (save, stop).
    It replaces torch's worker SIGTERM handler, which dies unless the parent sent the
    signal (and then exits), and the rank's own handlers, inherited through fork; SIGINT
    and torch's other handlers are left as they are. A handler that does nothing rather
    than SIG_IGN: an ignored signal stays ignored in the ``pipe:`` commands the worker
    starts (a shell cannot undo that), a handler is reset to the default by exec. The
    worker was started with these signals blocked (``_start_workers``): one sent before
    this point was held, and reaches the no-op handler now."""
    for signum in RANK_SIGNALS:
        signal.signal(signum, _leave_to_the_rank)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RANK_SIGNALS)
    _die_with_the_rank()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_rank_pid: int | None = None  # the process that starts the workers (_start_workers)


def _die_with_the_rank() -> None:
    """Linux: the kernel SIGKILLs this worker the moment the rank that started it dies.
    torch's watchdog only looks between batches (every 5 s), so a worker busy or stuck
    in a batch could outlive a SIGKILLed rank by far; a worker has nothing to save.
    (The death signal follows the thread that forked the worker: the loader is iterated
    in the rank's main thread.) Elsewhere, torch's watchdog alone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if _rank_pid is not None and os.getppid() != _rank_pid:  # it died before the prctl
        os._exit(1)


def _leave_to_the_rank(signum, frame) -> None:
    """A worker's SIGTERM, SIGUSR1 and SIGUSR2 handler: the rank got the signal too, and decides."""


def _start_workers(loader: DataLoader):
    """``iter(loader)``, its worker processes started with RANK_SIGNALS blocked
    (a child inherits the signal mask): between its start and its worker_init_fn, torch's
    worker handler would act on a SIGTERM. This process's own mask is restored after, and
    a signal that came meanwhile is delivered then. The iterator is kept (weakly) for
    ``_stop_workers_at_exit``."""
    global _exit_hook_registered, _rank_pid
    if loader.num_workers == 0:
        return iter(loader)
    _rank_pid = os.getpid()  # the workers, forked from here, compare their parent with it
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, RANK_SIGNALS)
    try:
        iterator = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if not _exit_hook_registered:
        # Registered after multiprocessing's own exit hook, so it runs before it.
        atexit.register(_stop_workers_at_exit)
        _exit_hook_registered = True
    _LIVE_ITERATORS.add(iterator)
    return iterator


# DataLoader iterators whose workers may still run: a process that exits with one alive
# (the trainer leaving for a requeue in the middle of an epoch) would otherwise hang in
# multiprocessing's exit hook, which SIGTERMs daemonic children and then waits for them.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def _stop_workers_at_exit() -> None:
    for iterator in list(_LIVE_ITERATORS):
        _stop_workers(iterator)


def _stop_workers(iterator) -> None:
    """End a DataLoader iterator's workers now, on its own shutdown path (a "done" event
    and a None in each index queue, then a join). torch's last resort for a worker that
    does not exit (stuck in a read, say) is SIGTERM, which the workers ignore: SIGKILL
    it instead."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:  # no worker processes
        return
    shutdown()
    for worker in getattr(iterator, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=10)


# --------------------------------------------------------------------------- main process
class ShardLoader:
    """Iterating gives one epoch of this rank's batches (endless when resampled)."""

    def __init__(self, config: LoaderConfig, rank: int = 0, world_size: int = 1,
                 tokenizer: CaptionTokenizer | None = None):  # fmt: skip
        """``tokenizer``: what encodes the captions (``CaptionTokenizer.load(path,
        context_length)``; its context length is the batches' token length), needed when
        ``config.captions``; unused without captions."""
        if config.batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {config.batch_size}")
        try:
            check_decoder(config.image.decoder)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        check_cap("max_member_bytes", config.max_member_bytes)
        check_cap("image.max_pixels", config.image.max_pixels)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.sources = resolve_sources(config.shards)
        if config.captions and tokenizer is None:
            raise DataError(
                "captions=True needs a tokenizer: ShardLoader(..., tokenizer="
                "CaptionTokenizer.load(path)) (build one with `megabatch data tokenizer`)"
            )
        self.tokenizer = tokenizer if config.captions else None
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
        context = self.tokenizer.context_length if self.tokenizer is not None else 0
        layout = BatchLayout(cfg.batch_size, cfg.image.load_size or cfg.image.size, context)
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
            worker_init_fn=_leave_signals_to_the_rank if workers > 0 else None,
        )
        # A fresh epoch (not one resumed part-way, which may have nothing left) must
        # give this rank a batch: see _empty_epoch.
        fresh = not any(self.positions)
        batches, ends, skips = 0, {}, Counter()
        iterator = _start_workers(loader)
        try:
            for item in iterator:
                if isinstance(item, _WorkerEnd):
                    ends[item.worker] = item
                    self.positions[item.worker] = item.position
                    self.skipped_total.update(item.skipped)
                    skips.update(item.skipped)
                    continue
                if isinstance(item, _WorkerFailed):
                    raise DataError(item.message)
                batch = item
                if batch.lease is not None:  # the worker may reuse the buffer once freed
                    pools.release_on_free(batch.images, *batch.lease[1:])
                self.positions[batch.worker] = batch.position
                self.rotation = (batch.worker + 1) % self._workers
                self.skipped_total.update(batch.skipped)
                skips.update(batch.skipped)
                batches += 1
                yield batch
        finally:
            _stop_workers(iterator)
        if batches == 0 and fresh:
            self.positions = [0] * self._workers  # as it was: iterating again fails again
            raise DataError(self._empty_epoch(ends, skips))
        if not cfg.resampled:
            self.epoch += 1
            self.positions = [0] * self._workers
            self.rotation = 0

    def _empty_epoch(self, ends: dict[int, _WorkerEnd], skips: Counter) -> str:
        """Why a fresh epoch gave this rank no batch, in one line."""
        cfg = self.config
        where = f"epoch {self.epoch} gave rank {self.rank} of {self.world_size} no batch"
        usable = [ends[w].usable if w in ends else 0 for w in range(self._workers)]
        read = sum(end.read for end in ends.values())
        workers = (f"{cfg.num_workers} workers" if cfg.num_workers else
                   "num_workers=0: read in this process")  # fmt: skip
        if any(usable):
            return (f"{where}: too few usable samples for a batch (usable samples per worker: "
                    f"{usable}; batch_size {cfg.batch_size}, drop_last={cfg.drop_last}, "
                    f"{workers}); use more data, a smaller batch_size or fewer workers")  # fmt: skip
        if read:
            return (f"{where}: none of the {read} samples it read is usable (skipped: "
                    f"{_skip_counts(skips)})")  # fmt: skip
        shards = self._rank_shards()
        if skips["bad_shard"]:
            return (f"{where}: every one of its {shards} shards is unreadable or empty "
                    f"(skipped: {_skip_counts(skips)})")  # fmt: skip
        slots = f"{self.world_size} ranks x {self._workers} workers"
        return (f"{where}: its {shards} shards hold no sample for it (empty tars, or fewer "
                f"samples than {slots})")  # fmt: skip

    def _rank_shards(self) -> int:
        """How many shards this rank's workers read this epoch."""
        total = 0
        for i, source in enumerate(self.sources):
            shards = set()
            for worker in range(self._workers):
                slot = Slot(self.rank, self.world_size, worker, self._workers)
                shards.update(epoch_share(len(source.urls), self.config.seed, self.epoch,
                                          slot, source=i).shards)  # fmt: skip
            total += len(shards)
        return total

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
