"""With a process group, the loss and every gradient equal one process on the whole batch.

Two gloo ranks each hold a slice of a seeded global batch (equal and unequal slices; each
rank's two sides in one buffer, the trainer's layout), call the loss with process_group, and back-propagate; the single-process loss on the
concatenated batch, computed here with the full-logits reference, must match, and each
rank's feature gradients must equal the matching rows of the single-process gradients.
Tolerance: fp32, the same sums in a different order (see test_contrastive.py).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megabatch.kernels import clip_loss, ntxent_loss
from megabatch.kernels.reference import clip_loss_reference, ntxent_loss_reference
from tests.multiproc import run_ranks

D = 24
LOSSES = {
    "clip": (clip_loss, clip_loss_reference, 1 / 0.07),
    "ntxent": (ntxent_loss, ntxent_loss_reference, 0.2),
}


def _global_batch(n: int):
    g = torch.Generator().manual_seed(7)
    a = F.normalize(torch.randn(n, D, generator=g), dim=1)
    b = F.normalize(a + torch.randn(n, D, generator=g), dim=1)
    return a, b


def _rank_step(rank, world_size, loss_name, backend, counts):
    fn, _, s = LOSSES[loss_name]
    a, b = _global_batch(sum(counts))
    start = sum(counts[:rank])
    # Local features as the trainer hands them: both sides halves of one buffer (NT-Xent
    # stacks them without a copy).
    rows = slice(start, start + counts[rank])
    a_local, b_local = torch.cat([a[rows], b[rows]]).split(counts[rank])
    a_local.requires_grad_(), b_local.requires_grad_()
    scale = torch.tensor(s, requires_grad=True)
    loss = fn(a_local, b_local, scale, process_group=dist.group.WORLD, backend=backend)
    loss.backward()
    return loss.detach(), a_local.grad, b_local.grad, scale.grad


@pytest.mark.multiproc
@pytest.mark.parametrize("counts", [[5, 5], [3, 6]], ids=["equal", "unequal"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_two_ranks_match_one_process(loss_name, backend, counts):
    results = run_ranks(_rank_step, 2, loss_name, backend, counts, timeout_s=90)

    _, ref, s = LOSSES[loss_name]
    a, b = _global_batch(sum(counts))
    a.requires_grad_()
    b.requires_grad_()
    scale = torch.tensor(s, requires_grad=True)
    want_loss = ref(a, b, scale)
    want_a, want_b, want_s = torch.autograd.grad(want_loss, (a, b, scale))

    for rank, (loss, grad_a, grad_b, grad_s) in enumerate(results):
        rows = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
        torch.testing.assert_close(loss, want_loss.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_a, want_a[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_b, want_b[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_s, want_s, atol=1e-6, rtol=1e-5)
