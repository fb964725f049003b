"""all_gather_with_grad: forward is the concatenation; backward matches one process."""

import pytest
import torch

from megabatch.kernels.distributed import all_gather_with_grad, group_rank_and_size
from tests.multiproc import run_ranks

D = 4  # feature width
SEED = 1234


def _global_input(counts: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(sum(counts), D, generator=g, dtype=torch.float64)  # (N, D)


def _weights(rank: int, n_global: int) -> torch.Tensor:
    # Rank-dependent weights, so each rank's loss differs and the summed gradient matters.
    g = torch.Generator().manual_seed(SEED + 1 + rank)
    return torch.randn(n_global, D, generator=g, dtype=torch.float64)  # (N, D)


def _rank_loss(rank: int, local: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    # Non-linear in the gathered tensor, plus a local-only term: gradient reaches this
    # rank's rows both through the collective and directly.
    w = _weights(rank, gathered.shape[0])
    return (w * torch.tanh(gathered)).sum() + (rank + 1) * (local**3).sum()


def _gather_and_backprop(rank: int, world_size: int, counts: list[int]):
    assert group_rank_and_size(None) == (rank, world_size)
    x = _global_input(counts)
    start = sum(counts[:rank])
    local = x[start : start + counts[rank]].clone().requires_grad_(True)  # (n_r, D)
    gathered = all_gather_with_grad(local)  # (N, D)
    _rank_loss(rank, local, gathered).backward()
    return gathered.detach(), local.grad


@pytest.mark.multiproc
@pytest.mark.parametrize("counts", [[3, 5], [4, 4]], ids=["unequal_rows", "equal_rows"])
def test_gather_matches_single_process(counts):
    results = run_ranks(_gather_and_backprop, len(counts), counts, timeout_s=60)

    # Single-process reference: the sum over ranks of each rank's loss, on the full tensor.
    x = _global_input(counts).requires_grad_(True)
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    total = sum(
        _rank_loss(r, x[o : o + n], x) for r, (o, n) in enumerate(zip(offsets, counts, strict=True))
    )
    total.backward()

    for rank, (gathered, grad) in enumerate(results):
        torch.testing.assert_close(gathered, x.detach(), rtol=0, atol=0)
        o, n = offsets[rank], counts[rank]
        assert grad.shape == (n, D)
        torch.testing.assert_close(grad, x.grad[o : o + n])


def test_identity_without_process_group():
    assert group_rank_and_size(None) == (0, 1)
    x = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
    out = all_gather_with_grad(x)
    assert out is x
    (out * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
