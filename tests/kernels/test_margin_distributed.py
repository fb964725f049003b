"""margin_contrastive_loss with a process group equals one process on the whole batch.

Two gloo ranks each hold a slice of a seeded global batch (equal and unequal slices),
call the loss with process_group and back-propagate; the full-distances reference on the
concatenated batch must give the same loss on every rank, and each rank's gradients must
equal the matching rows of the single-process gradients (cross-rank pairs are negatives,
each positive is counted once). Tolerance: fp32, the same sums in a different order
(test_margin.py).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megabatch.kernels import margin_contrastive_loss
from megabatch.kernels.reference import margin_contrastive_loss_reference
from tests.multiproc import run_ranks

D = 24
MARGIN = 1.4


def _global_batch(n: int):
    g = torch.Generator().manual_seed(7)
    a = F.normalize(torch.randn(n, D, generator=g), dim=1)
    b = F.normalize(a + torch.randn(n, D, generator=g), dim=1)
    return a, b


def _rank_step(rank, world_size, counts):
    a, b = _global_batch(sum(counts))
    rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    a_local = a[rows].clone().requires_grad_()
    b_local = b[rows].clone().requires_grad_()
    loss = margin_contrastive_loss(
        a_local, b_local, MARGIN, process_group=dist.group.WORLD, backend="torch"
    )
    loss.backward()
    return loss.detach(), a_local.grad, b_local.grad


@pytest.mark.multiproc
@pytest.mark.parametrize("counts", [[5, 5], [3, 6]], ids=["equal", "unequal"])
def test_two_ranks_match_one_process(counts):
    results = run_ranks(_rank_step, 2, counts, timeout_s=90)

    a, b = _global_batch(sum(counts))
    a.requires_grad_()
    b.requires_grad_()
    want_loss = margin_contrastive_loss_reference(a, b, MARGIN)
    want_a, want_b = torch.autograd.grad(want_loss, (a, b))
    assert (want_a != 0).any() and want_loss > 0.5 * (a - b).square().sum(1).mean()

    for rank, (loss, grad_a, grad_b) in enumerate(results):
        rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        torch.testing.assert_close(loss, want_loss.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_a, want_a[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b, want_b[rows], atol=1e-6, rtol=1e-5)
