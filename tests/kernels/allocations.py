"""The probe the kernel tests use to show that a loss never allocates an N x N tensor."""

from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@contextmanager
def largest_allocation():
    """Yields a one-element list that holds, when the block ends, the element count of
    the largest tensor any op made inside it (every tensor through the torch dispatcher,
    forward and backward). With N > D, anything of N * N / 2 elements or more is
    quadratic; the tests shrink torch_backend's tiles below that."""
    largest = [0]

    class LargestAllocation(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())
            return out

    with LargestAllocation():
        yield largest
