"""The margin contrastive loss (Hadsell, Chopra and LeCun 2006) over a batch, tiled.

For N pairs (a_i, b_i), D_ij = |a_i - b_j| (Euclidean) and margin m > 0:

    L = 1/N        sum_i        1/2 D_ii^2                  (the N positives)
      + 1/(N(N-1)) sum_{i != j} 1/2 max(0, m - D_ij)^2      (the N(N-1) negatives)

The paper's per-pair loss (1 - Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2, with a_i's partner b_i
the positive (Y = 0) and every other cross pair (a_i, b_j) a negative (Y = 1), as CLIP's
pairs. Two means rather than one over all N^2 pairs: with one, the N - 1 negatives of
each positive would outweigh it more as the batch grows, and the loss's balance would
change with N; two means give both kinds equal weight at every N, as the paper's balanced
pairs did. With N = 1 there is no negative and the second term is 0.

No N x N tensor exists: the positives take O(N D) (D_ii^2 = |a_i - b_i|^2, computed from
the difference, exactly), the negatives run over tiles (margin_torch.py, which also gives
the gradients and the definition at D_ij = 0: gradient 0).

Passes, for M local rows per rank and N global:
    forward   gather B (and A, with ranks); sum of h^2 over A_local x B_global tiles
              -> the loss, one scalar all-reduce
    backward  one process: one pass over A x B gives dA (row sums) and dB (column sums)
              ranks: dA_local from A_local x B_global, dB_local from B_local x A_global
              (the roles swapped: D is symmetric), as contrastive.py's CLIP passes;
              no gradient is reduced across ranks.
"""

from __future__ import annotations

import math

import torch

from megabatch.kernels import margin_torch
from megabatch.kernels.contrastive import (
    _all_reduce_sum,
    _check_features,
    _check_group,
    _gather_rows,
)
from megabatch.kernels.distributed import group_rank_and_size
from megabatch.kernels.torch_backend import _compute_dtype

BACKENDS = ("auto", "torch", "reference")
_NAME = "margin_contrastive_loss"


def _mean_coefficients(n: int) -> tuple[float, float]:
    """1/N for the positives' sum, 1/(N(N-1)) for the negatives' (0 when N = 1)."""
    return 1.0 / n, (1.0 / (n * (n - 1)) if n > 1 else 0.0)


def _positive_differences(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, D) a_i - b_i in the compute dtype."""
    dtype = _compute_dtype(a.dtype)
    return a.to(dtype) - b.to(dtype)


class _MarginContrastiveLoss(torch.autograd.Function):
    """The loss of the module docstring for local rows a, b (M, D); see its passes."""

    @staticmethod
    def forward(ctx, a, b, margin, group):
        b_global, offset, n = _gather_rows(b, group)
        single_process = group_rank_and_size(group)[1] == 1
        a_global = a if single_process else _gather_rows(a, group)[0]
        pos_coef, neg_coef = _mean_coefficients(n)
        positive_sum = _positive_differences(a, b).square().sum()  # sum_i D_ii^2, local
        negative_sum = margin_torch.negative_hinge_sum(a, b_global, margin, row_offset=offset)
        local = 0.5 * (pos_coef * positive_sum + neg_coef * negative_sum)
        ctx.save_for_backward(a, b, a_global, b_global)
        ctx.margin, ctx.group, ctx.offset = margin, group, offset
        ctx.coefs, ctx.single_process = (pos_coef, neg_coef), single_process
        return _all_reduce_sum(local, group)

    @staticmethod
    def backward(ctx, grad_loss):
        a, b, a_global, b_global = ctx.saved_tensors
        pos_coef, neg_coef = ctx.coefs
        grad_loss = grad_loss.to(_compute_dtype(a.dtype))
        neg_mult = (grad_loss * neg_coef).reshape(1)  # on the device: no host sync
        need_a, need_b = ctx.needs_input_grad[:2]
        run = margin_torch.negative_hinge_gradient
        if ctx.single_process:
            da, db = run(a, b_global, ctx.margin, neg_mult, row_offset=0, with_col_grad=need_b)
        else:
            kwargs = {"row_offset": ctx.offset, "with_col_grad": False}
            da = run(a, b_global, ctx.margin, neg_mult, **kwargs)[0] if need_a else None
            db = run(b, a_global, ctx.margin, neg_mult, **kwargs)[0] if need_b else None
        # d/da_i of 1/N sum 1/2 |a_i - b_i|^2 = (a_i - b_i) / N; d/db_i its negative.
        positive = _positive_differences(a, b).mul_(grad_loss * pos_coef)
        da = da.add_(positive).to(a.dtype) if need_a else None
        db = db.sub_(positive).to(b.dtype) if need_b else None
        return da, db, None, None


# --------------------------------------------------------------------------- validation
def _margin_value(margin) -> float:
    """The margin as a float: finite, > 0, and no tensor that requires grad."""
    if isinstance(margin, torch.Tensor):
        if margin.numel() != 1:
            raise ValueError(f"margin must be a scalar, got shape {tuple(margin.shape)}")
        if margin.requires_grad:
            raise ValueError("margin must not require grad: it is a fixed hyperparameter")
        value = float(margin.reshape(()))
    elif isinstance(margin, (int, float)) and not isinstance(margin, bool):
        value = float(margin)
    else:
        raise ValueError(f"margin must be a float or a scalar tensor, got {type(margin).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"margin must be finite and > 0, got {value}")
    return value


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(
            f"{_NAME}: backend must be one of {', '.join(BACKENDS)} (no Triton kernel), "
            f"got {backend!r}"
        )


# --------------------------------------------------------------------------- public API
def margin_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    margin: float | torch.Tensor,
    *,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """The margin contrastive loss of the module docstring over N pairs (a_i, b_i).

    a, b: (N, D), same dtype (fp32/bf16/fp16/fp64) and device; unnormalised rows are
    fine (the margin is in the distances' units: for unit rows, D is in [0, 2]).
    margin: m > 0, a float or a scalar tensor that does not require grad (no gradient is
    computed for it; one that requires grad is refused).
    Returns the scalar loss, fp32 (fp64 for fp64 features); gradients reach a and b in
    their dtype.

    process_group: with a group, each rank passes its local pairs; the loss and every
    gradient equal those of one process holding all ranks' pairs concatenated in rank
    order (every cross pair between ranks is a negative).
    backend: "torch" (the tiled passes, any device), "reference" (full N x N distances;
    tests and benchmarks only), "auto" (torch: there is no Triton kernel for this loss).
    """
    _check_features(_NAME, a, b)
    margin_value = _margin_value(margin)
    _check_backend(backend)
    _check_group(_NAME, process_group, backend)
    if backend == "reference":
        from megabatch.kernels.reference import margin_contrastive_loss_reference

        return margin_contrastive_loss_reference(a, b, margin_value)
    return _MarginContrastiveLoss.apply(a, b, margin_value, process_group)


__all__ = ["margin_contrastive_loss", "BACKENDS"]
