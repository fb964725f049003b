"""Collectives for contrastive losses: gather every rank's features, with or without
gradient. Imports only torch.

The fused losses (kernels.contrastive) gather without gradient: each rank computes the
complete gradient of its own rows itself. all_gather_with_grad is for losses written in
plain torch on top of gathered features (open_clip's pattern), where each rank's loss
back-propagates into every rank's rows and the backward must sum those contributions.
"""

import torch
import torch.distributed as dist

__all__ = ["all_gather_rows", "all_gather_with_grad", "group_rank_and_size"]


def group_rank_and_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_rows(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order, and each rank's row
    count. No gradient. Ranks may hold different numbers of rows (for example the last,
    short batch); all_gather needs equal shapes, so the counts are exchanged first and
    each rank's rows are padded to the largest and stripped again."""
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return tensor, [tensor.shape[0]]
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts_t = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts_t, count, group=group)
    counts = [int(c.item()) for c in counts_t]  # (world_size,) row counts
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))  # (n_max, *rest)
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([c[:n] for c, n in zip(chunks, counts, strict=True)], dim=0), counts


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        # tensor: (n_local, *rest) -> out: (n_global, *rest), rank 0's rows first.
        gathered, counts = all_gather_rows(tensor, group)
        ctx.group = group
        ctx.rank = group_rank_and_size(group)[0]
        ctx.counts = counts
        return gathered

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        # grad_out: (n_global, *rest) is this rank's gradient of its own loss with respect to
        # the gathered tensor. The gradient of the group's total loss with respect to this
        # rank's rows is the sum over ranks of their grad_out, restricted to those rows.
        #
        # all_reduce(SUM) + slice rather than reduce_scatter: gloo (the CPU backend that the
        # tests and CPU training use) has no reduce_scatter, and the rows are uneven anyway.
        # It moves about world_size times more data than a reduce_scatter would; that is small
        # for (n_global, D) features (docs/ARCHITECTURE.md, "Fused contrastive loss").
        grad = grad_out.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None  # (n_local, *rest)


def all_gather_with_grad(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, differentiably.

    ``tensor`` is (n_local, *rest); ranks may hold different n_local but must agree on
    ``rest`` and dtype. Returns (sum of n_local over ranks, *rest) in rank order. The
    backward pass sums the incoming gradient over all ranks and returns this rank's rows,
    so ``sum over ranks of loss_r`` back-propagates as if computed in one process.

    Without an initialised process group, or with a group of one, returns ``tensor`` as is.
    """
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)
