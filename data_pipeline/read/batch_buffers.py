"""Batch buffers that a loader worker reuses once the consumer has let go of them.

A worker writes each batch (images, and with captions the token ids and mask) into one
buffer in shared memory that the main process has mapped too. Left to the DataLoader,
every batch would be a fresh shared-memory segment per tensor: the kernel allocates and
zeroes it page by page on first touch, thousands of page faults a batch (what that cost:
docs/benchmarks-data.md, "Measurements"), and each segment's file descriptor is handed
over through a socket handshake. Instead the main process
makes every worker's pool of buffers before the workers start (``BatchPools``; the
pages are only allocated when first written), a worker writes a new batch into a buffer
it wrote before, and only the buffer's number travels with the batch
(``Batch.__reduce_ex__`` in the loader).

A buffer may be overwritten only when no batch made in it can still be read. The worker
cannot see the main process's references, so the main process tells it, through a lease
table in shared memory (one byte per pooled buffer, per worker):

- the worker sets the byte to 1 before it hands a batch made in that buffer out;
- the main process gives each batch it receives a storage of its own over the buffer's
  memory, and when the loader yields the batch, attaches a finalizer to the storage of
  the batch it yields (``BatchPools.release_on_free``); the finalizer sets the byte back
  to 0 when that storage is freed, that is once no tensor, view or NumPy array of it is
  left. With pin_memory the loader yields the pin-memory thread's pinned copy, made
  before the thread drops the buffer's views: the finalizer then watches the copy, which
  returns the buffer later than it could, never earlier;
- the worker reuses only a buffer whose byte is 0. When every pooled buffer is out, it
  makes a one-off buffer that travels the DataLoader's ordinary way and is never reused.
  A batch that never reaches the finalizer keeps its buffer leased for good: the pool
  then shrinks, which is slower, never unsafe.
"""

from __future__ import annotations

import secrets
import weakref
from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 64  # bytes: each array of a buffer starts on a cache line


@dataclass(frozen=True)
class BatchViews:
    """The arrays of one batch buffer, all views of one storage."""

    images: torch.Tensor  # (B, S, S, 3) uint8
    tokens: torch.Tensor | None  # (B, L) int64, None without captions
    mask: torch.Tensor | None  # (B, L) bool


class BatchLayout:
    """Where a batch's arrays sit in one flat uint8 buffer."""

    def __init__(self, batch_size: int, size: int, context_length: int):
        self.batch_size, self.size, self.context_length = batch_size, size, context_length
        self.tokens_at = _aligned(batch_size * size * size * 3)
        self.mask_at = _aligned(self.tokens_at + batch_size * context_length * 8)
        self.nbytes = self.mask_at + batch_size * context_length

    def views(self, flat: torch.Tensor) -> BatchViews:
        """The arrays over ``flat`` (1-D uint8 of ``nbytes``), sharing its storage."""
        storage, b, s, n = flat.untyped_storage(), self.batch_size, self.size, self.context_length
        images = _view(storage, 0, (b, s, s, 3), torch.uint8)
        if n == 0:
            return BatchViews(images, None, None)
        tokens = _view(storage, self.tokens_at, (b, n), torch.int64)
        return BatchViews(images, tokens, _view(storage, self.mask_at, (b, n), torch.bool))


# Pools by token, in every process that has them: the main process made them, and each
# worker has them through fork (or unpickling). Weak: a finished epoch's pools go.
_POOLS: weakref.WeakValueDictionary[int, BatchPools] = weakref.WeakValueDictionary()


class BatchPools:
    """Every worker's reusable batch buffers (``capacity`` each, flat uint8 of
    ``layout.nbytes``) and their lease table, made in the main process before the
    workers start; in shared memory when ``shared``."""

    def __init__(self, workers: int, capacity: int, layout: BatchLayout, shared: bool):
        self.layout, self.shared = layout, shared
        self.token = secrets.randbits(62)
        self.leases = torch.zeros((workers, capacity), dtype=torch.uint8)
        if shared:
            self.leases.share_memory_()
        self.buffers = [[new_buffer(layout.nbytes, shared) for _ in range(capacity)]
                        for _ in range(workers)]  # fmt: skip
        _POOLS[self.token] = self

    def __setstate__(self, state: dict) -> None:  # a spawned worker: register there too
        self.__dict__.update(state)
        _POOLS[self.token] = self

    def take(self, worker: int) -> tuple[int, torch.Tensor]:
        """A buffer of ``worker``'s that no handed-out batch uses, and its index; (-1, a
        one-off buffer) when every pooled one is out."""
        leases = self.leases[worker].numpy()
        for index, buffer in enumerate(self.buffers[worker]):
            if leases[index] == 0:
                return index, buffer
        return -1, new_buffer(self.layout.nbytes, self.shared)

    def lend(self, worker: int, index: int) -> None:
        """Mark buffer ``index`` as out: call before handing its batch over."""
        self.leases[worker, index] = 1

    def views(self, worker: int, index: int) -> BatchViews:
        """The arrays of buffer ``index`` over a storage of their own (freed when they
        are, which ``release_on_free`` watches), the same memory as the pool's."""
        return self.layout.views(torch.from_numpy(self.buffers[worker][index].numpy()))

    def release_on_free(self, tensor: torch.Tensor, worker: int, index: int) -> None:
        """Return buffer ``index`` of ``worker``'s pool once ``tensor``'s storage is freed
        in this process (every tensor, view and array of it gone)."""
        storage = tensor.untyped_storage()
        finalizer = weakref.finalize(storage, _release, self.leases.numpy(), worker, index)
        finalizer.atexit = False


def batch_pools(token: int) -> BatchPools | None:
    """This process's pools with ``token`` (None when gone)."""
    return _POOLS.get(token)


def new_buffer(nbytes: int, shared: bool) -> torch.Tensor:
    """A flat uint8 buffer; in shared memory straight away when ``shared`` (share_memory_()
    on a private tensor would allocate twice and copy)."""
    if not shared:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


def _release(table: np.ndarray, worker: int, index: int) -> None:
    table[worker, index] = 0


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _view(storage: torch.UntypedStorage, byte_offset: int, shape, dtype) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(storage, byte_offset // itemsize, shape)
