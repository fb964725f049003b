"""Plain accumulation (step.accumulation_step, the step of BYOL and the pretext tasks):
A micro-batches on W ranks give the update of the mean of their A W losses, which for a
per-sample mean loss over equal micro-batches is the update of one batch of all of them.
A non-finite first micro-batch skips the step on every rank; a later one is left out.

DeepSpeed on CPU ranks (gloo), plain SGD without momentum, so the update is lr x the
gradient. Tolerance: fp32, the same sums in different orders over 64 samples: 1e-6 of
the largest update entry plus one rounding of the parameter (1.2e-7 of its largest
entry: the update is read back as after - before).
"""

import math

import pytest
import torch

from tests.multiproc import run_ranks

N = 64


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 10, generator=g), torch.randint(0, 5, (N,), generator=g)


def _one_step(rank, world_size, micro, zero_stage, poison=(), lr=0.5, samples=N):
    """One accumulation step over this rank's share of the batch's first ``samples``;
    ``poison``: (rank, micro-batch index) pairs whose inputs are NaN."""
    from megabatch.trainer.config import load_config
    from megabatch.trainer.engine import build_engine
    from megabatch.trainer.losses import classification_loss
    from megabatch.trainer.step import accumulation_step

    accumulation = samples // (micro * world_size)
    config = load_config(None, [
        f"batch.micro_batch_size={micro}", f"batch.accumulation_steps={accumulation}",
        "optim.name=sgd", "optim.momentum=0.0", f"optim.lr={lr}", "optim.weight_decay=0.0",
        "optim.warmup_steps=0", "optim.grad_clip=null", f"engine.zero_stage={zero_stage}",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _ = build_engine(model, config)

    x, y = _batch()
    rows = torch.arange(samples).view(world_size, accumulation, micro)[rank]
    micro_batches = [(x[r].clone(), y[r]) for r in rows]
    for r, k in poison:
        if r == rank:
            micro_batches[k][0][0, 0] = math.nan

    result = accumulation_step(
        engine, micro_batches, lambda m, b: {"logits": m(b[0]), "labels": b[1]},
        lambda f, p: classification_loss(f), lambda m: {}, world_size, skip_nonfinite=True,
    )  # fmt: skip
    after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return result.loss, result.skipped, {n: (after[n] - before[n], before[n].abs().max())
                                         for n in before}  # fmt: skip


def _assert_same_update(got, want):
    for name, (update, param_max) in want.items():
        atol = 1e-6 * update.abs().max().item() + 1.2e-7 * param_max.item()
        torch.testing.assert_close(got[name][0], update, atol=atol, rtol=1e-5, msg=name)


@pytest.mark.multiproc
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_accumulation_gives_the_update_of_one_big_batch(zero_stage):
    ((loss_big, _, update_big),) = run_ranks(_one_step, 1, N, zero_stage, timeout_s=110)
    ((loss_acc, _, update_acc),) = run_ranks(_one_step, 1, 16, zero_stage, timeout_s=110)
    ranks = run_ranks(_one_step, 2, 16, zero_stage, timeout_s=110)
    assert all(u.abs().max() > 0 for u, _ in update_big.values())
    torch.testing.assert_close(loss_acc, loss_big, atol=1e-6, rtol=1e-6)
    _assert_same_update(update_acc, update_big)
    for loss, skipped, update in ranks:  # every rank: the global loss, the global update
        assert not skipped
        torch.testing.assert_close(loss, loss_big, atol=1e-6, rtol=1e-6)
        _assert_same_update(update, update_big)


@pytest.mark.multiproc
def test_a_nonfinite_first_micro_batch_on_one_rank_skips_the_step_everywhere():
    ranks = run_ranks(_one_step, 2, 16, 0, [(1, 0)], timeout_s=110)
    for _, skipped, update in ranks:
        assert skipped
        assert all(torch.equal(u, torch.zeros_like(u)) for u, _ in update.values())
    assert math.isfinite(ranks[0][0]) and not math.isfinite(ranks[1][0])  # each its own


@pytest.mark.multiproc
def test_a_later_nonfinite_micro_batch_is_left_out():
    """Micro-batch 1 of 2 poisoned: the update is micro-batch 0's gradient over A = 2,
    that is one step on micro-batch 0 alone at half the learning rate."""
    ((loss, skipped, update),) = run_ranks(_one_step, 1, 32, 0, [(0, 1)], timeout_s=110)
    assert not skipped
    ((loss_first, _, update_first),) = run_ranks(_one_step, 1, 32, 0, (), 0.25, 32,
                                                 timeout_s=110)  # fmt: skip
    torch.testing.assert_close(loss, loss_first)
    _assert_same_update(update, update_first)
