"""Both fused backends provide the one interface declared in kernels/backend.py."""

import inspect

import pytest

from megabatch.kernels import torch_backend
from megabatch.kernels.backend import ContrastiveBackend, LossMode
from megabatch.kernels.contrastive import BACKENDS


def _backends():
    from megabatch.kernels import triton_backend  # imports triton

    return {"torch": torch_backend.BACKEND, "triton": triton_backend.BACKEND}


def test_loss_modes_are_the_kernels_constexpr_ints():
    assert [(m.name, int(m)) for m in LossMode] == [("CLIP", 0), ("NTXENT", 1)]


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_backend_provides_the_interface(name):
    backend = _backends()[name]
    assert isinstance(backend, ContrastiveBackend)
    assert backend.name == name and name in BACKENDS
    for method in ("row_logsumexp", "row_gradient"):
        want = list(inspect.signature(getattr(ContrastiveBackend, method)).parameters.values())
        got = list(inspect.signature(getattr(backend, method)).parameters.values())
        # Same names, kinds and defaults as the protocol's (less self); annotations aside.
        assert [(p.name, p.kind, p.default) for p in got] == [
            (p.name, p.kind, p.default) for p in want[1:]
        ], method
