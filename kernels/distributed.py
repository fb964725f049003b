"""Collectives for the contrastive loss: gather features from every rank, with gradient.

Each rank computes the loss of its local rows against the global columns, so it needs
every rank's features (forward) and must send back to each rank the gradient that the
whole group computed for that rank's rows (backward). Imports only torch.
"""

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "group_rank_and_size"]


def group_rank_and_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        # tensor: (n_local, *rest) -> out: (n_global, *rest), rank 0's rows first.
        rank, world_size = group_rank_and_size(group)

        # Ranks may hold different numbers of rows (for example the last, short batch), and
        # all_gather needs equal shapes: exchange the row counts, pad to the largest, strip.
        count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
        counts_t = [torch.empty_like(count) for _ in range(world_size)]
        dist.all_gather(counts_t, count, group=group)
        counts = [int(c.item()) for c in counts_t]  # (world_size,) row counts
        n_max = max(counts)

        tensor = tensor.contiguous()
        if tensor.shape[0] < n_max:
            pad = tensor.new_zeros((n_max - tensor.shape[0], *tensor.shape[1:]))
            tensor = torch.cat([tensor, pad], dim=0)  # (n_max, *rest)
        chunks = [
            torch.empty_like(tensor) for _ in range(world_size)
        ]  # world_size x (n_max, *rest)
        dist.all_gather(chunks, tensor, group=group)

        ctx.group = group
        ctx.rank = rank
        ctx.counts = counts
        return torch.cat([c[:n] for c, n in zip(chunks, counts, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        # grad_out: (n_global, *rest) is this rank's gradient of its own loss with respect to
        # the gathered tensor. The gradient of the group's total loss with respect to this
        # rank's rows is the sum over ranks of their grad_out, restricted to those rows.
        #
        # all_reduce(SUM) + slice rather than reduce_scatter: gloo (the CPU backend that the
        # tests and CPU training use) has no reduce_scatter, and the rows are uneven anyway.
        # It moves about world_size times more data than a reduce_scatter would; that is small
        # for (n_global, D) features, and the planned ring exchange replaces it (DESIGN.md 4).
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
