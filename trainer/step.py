"""The two kinds of optimizer step (``STEPS``; a task names its ``step_kind``).

``accumulation_step``: plain gradient accumulation, for losses that couple no samples
across micro-batches (BYOL's regression, the pretext tasks' classification): forward,
loss and backward per micro-batch.

``gradcache_step``: one optimizer step whose contrastive batch is every micro-batch of
every rank: the GradCache method (Gao et al., 2021).

1. Forward every micro-batch without grad; keep the features (A x m rows per rank) and
   the random state each forward started from.
2. Compute the loss on all of them at once (the fused kernels gather the other ranks'
   rows), with the features and the learnt loss parameters (CLIP's logit scale,
   SigLIP's scale and bias) as leaves: their gradients, and the global loss, come out.
   Nothing of the towers' activations is alive at this point.
3. Re-run each micro-batch with grad from its saved random state (same augmentation,
   same dropout) and back-propagate the cached feature gradients through it:
   ``surrogate = sum(features * cached_grad)`` has exactly those gradients.

A target network's features (``targets``: a momentum encoder's, no grad) are computed
once, in step 1, and enter the loss as constants; the re-run does not repeat them.

Scaling: DeepSpeed divides each backward by the accumulation steps A and averages
gradients over the W ranks. Each rank's surrogate carries only its own rows' share of
the parameter gradient (the global gradient is the sum over ranks), so its feature part
is multiplied by A x W; the loss parameters' gradients are already the global ones on
every rank, so their part is multiplied by A alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

Features = dict[str, torch.Tensor]


@dataclass
class StepResult:
    loss: torch.Tensor  # the global loss, 0-dim, on the device
    loss_params: dict[str, torch.Tensor]  # the learnt loss parameters it used, detached
    skipped: bool = False  # the loss was not finite: no update was made


def gradcache_step(
    engine,
    micro_batches: Sequence,
    encode: Callable[..., Features],
    loss_fn: Callable[[Features, Features], torch.Tensor],
    params_fn: Callable[..., Features],
    world_size: int,
    targets: Callable[..., Features] | None = None,
    skip_nonfinite: bool = False,
) -> StepResult:
    """encode(model, micro_batch) -> named features of the micro-batch's rows, each
    (B, D) ({"image": ..., "text": ...}, {"view1": ..., "view2": ...}); targets(micro_batch)
    -> named features without grad ({"z1": ..., "z2": ...}), or None; loss_fn(features,
    params) -> the global loss of every micro-batch's features (name -> (A B, D)) and the
    learnt loss parameters; params_fn(model) -> those parameters with grad, by name
    ({"logit_scale": ...}, with SigLIP's "logit_bias"; {} for a fixed temperature). With
    skip_nonfinite, a non-finite global loss (the same on every rank) skips the re-runs
    and the update: the step's one host sync, taken before any backward work is queued."""
    model = engine.module
    accumulation = len(micro_batches)

    # 1. Features without grad, and the random state each forward starts from.
    rng_states, cached, fixed = [], [], []
    with torch.no_grad():
        for micro in micro_batches:
            rng_states.append(_rng_state())
            cached.append(encode(model, micro))
            if targets is not None:
                fixed.append(targets(micro))
    names = list(cached[0])

    # 2. The loss over the whole contrastive batch, and its gradient wrt the features.
    # Every name's rows in one (len(names) x A B, D) buffer, name after name: NT-Xent
    # stacks [view1; view2] as its rows and, laid out like this, takes that as a view
    # instead of copying (kernels.contrastive._stacked).
    sizes = [len(c[names[0]]) for c in cached]
    buffer = torch.cat([c[name] for name in names for c in cached])
    features = {name: part.requires_grad_()
                for name, part in zip(names, buffer.split(sum(sizes)), strict=True)}  # fmt: skip
    del buffer, cached
    constants = {name: torch.cat([f[name] for f in fixed]) for name in fixed[0]} if fixed else {}
    del fixed
    with torch.no_grad():
        params = {k: v.detach() for k, v in params_fn(model).items()}
    for leaf in params.values():
        leaf.requires_grad_()
    loss = loss_fn({**features, **constants}, params)
    if skip_nonfinite and not bool(torch.isfinite(loss)):
        return StepResult(loss.detach(), _detached(params), True)
    leaves = [*features.values(), *params.values()]
    grads = dict(zip([*features, *params], torch.autograd.grad(loss, leaves), strict=True))
    feature_grads = {name: grads[name].split(sizes) for name in names}
    del features, constants

    # 3. Re-run each micro-batch with grad and back-propagate the cached gradients.
    features_weight = float(accumulation * world_size)
    for k, micro in enumerate(micro_batches):
        with _replayed_rng(rng_states[k]):
            rerun = encode(model, micro)
        surrogate = features_weight * sum((rerun[name] * feature_grads[name][k]).sum()
                                          for name in names)  # fmt: skip
        if k == 0 and params:
            live = params_fn(model)
            surrogate = surrogate + accumulation * sum((live[name] * grads[name]).sum()
                                                       for name in params)  # fmt: skip
        engine.backward(surrogate)
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
    return StepResult(loss.detach(), _detached(params))


def accumulation_step(
    engine,
    micro_batches: Sequence,
    encode: Callable[..., Features],
    loss_fn: Callable[[Features, Features], torch.Tensor],
    params_fn: Callable[..., Features],
    world_size: int,
    targets: Callable[..., Features] | None = None,
    skip_nonfinite: bool = False,
) -> StepResult:
    """Plain gradient accumulation: per micro-batch, encode (and targets, without grad),
    the loss of that micro-batch alone, backward. DeepSpeed divides each backward by the
    A micro-batches and averages over the W ranks, so the update is the gradient of the
    mean of the A W micro-batch losses (the global batch mean for equal micro-batches);
    the loss reported is that mean (one all-reduce). Same arguments as gradcache_step.

    Non-finite losses (skip_nonfinite; a host sync per micro-batch): the first
    micro-batch's loss decides for every rank, before any backward (one all-reduce):
    non-finite on any rank, the step is skipped with no update, as gradcache_step skips
    it. A later micro-batch whose loss is not finite (a bad batch: the weights gave a
    finite loss a moment ago) contributes no gradient: a zero surrogate takes its
    backward, so DeepSpeed's accumulation count still reaches A; the reported loss
    leaves it out."""
    model = engine.module
    losses = []
    for k, micro in enumerate(micro_batches):
        features = encode(model, micro)
        if targets is not None:
            with torch.no_grad():
                features = {**features, **targets(micro)}
        params = params_fn(model)
        loss = loss_fn(features, params)
        if skip_nonfinite and k == 0 and not _finite_everywhere(loss, world_size):
            return StepResult(loss.detach(), _detached(params), True)
        if skip_nonfinite and not bool(torch.isfinite(loss)):
            loss = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        else:
            losses.append(loss.detach())
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
    return StepResult(_global_mean(losses, world_size), _detached(params))


STEPS = {"gradcache": gradcache_step, "accumulate": accumulation_step}


def _finite_everywhere(loss: torch.Tensor, world_size: int) -> bool:
    bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    if world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _global_mean(losses: list[torch.Tensor], world_size: int) -> torch.Tensor:
    """The mean of every rank's finite micro-batch losses, on every rank."""
    finite = torch.stack(losses).float()
    total = torch.stack([finite.sum(), finite.new_tensor(float(len(losses)))])
    if world_size > 1:
        dist.all_reduce(total)
    return total[0] / total[1]


def _detached(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in params.items()}


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
