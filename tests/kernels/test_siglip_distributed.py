"""SigLIP with a process group: the loss and every gradient equal one process's.

Two gloo ranks each hold a slice of a seeded global batch (equal and unequal slices; each
rank's two sides in one buffer, the trainer's layout), call siglip_loss with
process_group and back-propagate; the full-logits reference on the concatenated batch
in one process must give the same loss, dL/dt and dL/db, and each rank's feature
gradients must equal the matching rows of its feature gradients. Tolerance: fp32, the
same sums in a different order (test_siglip.py).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megabatch.kernels import siglip_loss
from megabatch.kernels.reference import siglip_loss_reference
from tests.multiproc import run_ranks

D = 24
T, B = 10.0, -3.0  # a bias at which the negatives' terms are not all negligible


def _global_batch(n: int):
    g = torch.Generator().manual_seed(7)
    a = F.normalize(torch.randn(n, D, generator=g), dim=1)
    b = F.normalize(a + torch.randn(n, D, generator=g), dim=1)
    return a, b


def _rank_step(rank, world_size, backend, counts):
    a, b = _global_batch(sum(counts))
    rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    a_local, b_local = torch.cat([a[rows], b[rows]]).split(counts[rank])
    a_local.requires_grad_(), b_local.requires_grad_()
    t = torch.tensor(T, requires_grad=True)
    bias = torch.tensor(B, requires_grad=True)
    loss = siglip_loss(a_local, b_local, t, bias, process_group=dist.group.WORLD, backend=backend)
    loss.backward()
    return loss.detach(), a_local.grad, b_local.grad, t.grad, bias.grad


@pytest.mark.multiproc
@pytest.mark.parametrize("counts", [[5, 5], [3, 6]], ids=["equal", "unequal"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_two_ranks_match_one_process(backend, counts):
    results = run_ranks(_rank_step, 2, backend, counts, timeout_s=90)

    a, b = _global_batch(sum(counts))
    a.requires_grad_(), b.requires_grad_()
    t = torch.tensor(T, requires_grad=True)
    bias = torch.tensor(B, requires_grad=True)
    want_loss = siglip_loss_reference(a, b, t, bias)
    want_a, want_b, want_t, want_bias = torch.autograd.grad(want_loss, (a, b, t, bias))

    for rank, (loss, grad_a, grad_b, grad_t, grad_bias) in enumerate(results):
        rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        torch.testing.assert_close(loss, want_loss.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_a, want_a[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b, want_b[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_t, want_t, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_bias, want_bias, atol=1e-6, rtol=1e-5)
