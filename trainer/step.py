"""One optimizer step whose contrastive batch is every micro-batch of every rank: the
GradCache method (Gao et al., 2021).

1. Forward every micro-batch without grad; keep the features (A x m rows per rank) and
   the random state each forward started from.
2. Compute the loss on all of them at once (the fused kernels gather the other ranks'
   rows), with the features and the logit scale as leaves: their gradients, and the
   global loss, come out. Nothing of the towers' activations is alive at this point.
3. Re-run each micro-batch with grad from its saved random state (same augmentation,
   same dropout) and back-propagate the cached feature gradients through it:
   ``surrogate = sum(features * cached_grad)`` has exactly those gradients.

Scaling: DeepSpeed divides each backward by the accumulation steps A and averages
gradients over the W ranks. Each rank's surrogate carries only its own rows' share of
the parameter gradient (the global gradient is the sum over ranks), so its feature part
is multiplied by A x W; the logit scale's gradient is already the global one on every
rank, so its part is multiplied by A alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    loss: torch.Tensor  # the global loss, 0-dim, on the device
    logit_scale: torch.Tensor | None
    skipped: bool = False  # the loss was not finite: no update was made


def gradcache_step(
    engine,
    micro_batches: Sequence,
    encode: Callable,
    loss_fn: Callable,
    scale_fn: Callable | None,
    world_size: int,
    skip_nonfinite: bool = False,
) -> StepResult:
    """encode(model, micro_batch) -> (a, b) features of the micro-batch's rows;
    loss_fn(a_all, b_all, scale) -> global loss; scale_fn(model) -> the logit scale with
    grad (CLIP) or None (a fixed temperature). With skip_nonfinite, a non-finite global
    loss (the same on every rank) skips the re-runs and the update: the step's one host
    sync, taken before any backward work is queued."""
    model = engine.module
    accumulation = len(micro_batches)

    # 1. Features without grad, and the random state each forward starts from.
    rng_states, cached_a, cached_b = [], [], []
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append(_rng_state())
            a, b = encode(model, micro)
            cached_a.append(a)
            cached_b.append(b)

    # 2. The loss over the whole contrastive batch, and its gradient wrt the features.
    # Both sides in one (2M, D) buffer: NT-Xent stacks [a; b] as its rows and, laid out
    # like this, takes that as a view instead of copying (kernels.contrastive._stacked).
    rows_a = sum(len(x) for x in cached_a)
    features = torch.cat(cached_a + cached_b)
    a_all, b_all = features[:rows_a].requires_grad_(), features[rows_a:].requires_grad_()
    del features
    scale_leaf = None
    if scale_fn is not None:
        with torch.no_grad():
            scale_leaf = scale_fn(model).detach()
        scale_leaf.requires_grad_()
    loss = loss_fn(a_all, b_all, scale_leaf)
    if skip_nonfinite and not bool(torch.isfinite(loss)):
        return StepResult(
            loss.detach(), scale_leaf.detach() if scale_leaf is not None else None, True
        )
    leaves = [a_all, b_all] + ([scale_leaf] if scale_leaf is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    grad_a, grad_b = (
        grads[0].split([x.shape[0] for x in cached_a]),
        grads[1].split([x.shape[0] for x in cached_b]),
    )
    del cached_a, cached_b, a_all, b_all

    # 3. Re-run each micro-batch with grad and back-propagate the cached gradients.
    features_weight = float(accumulation * world_size)
    for k, micro in enumerate(micro_batches):
        with _replayed_rng(rng_states[k]):
            a, b = encode(model, micro)
        surrogate = features_weight * ((a * grad_a[k]).sum() + (b * grad_b[k]).sum())
        if k == 0 and scale_leaf is not None:
            surrogate = surrogate + accumulation * (scale_fn(model) * grads[2]).sum()
        engine.backward(surrogate)
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
    return StepResult(loss.detach(), scale_leaf.detach() if scale_leaf is not None else None)


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


class _replayed_rng:
    """Run a block from a saved random state and put the current one back after."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        self.saved = _rng_state()
        cpu, cuda = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    def __exit__(self, *exc):
        cpu, cuda = self.saved
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        return False
