"""SigLIP's pairwise sigmoid loss, fused: ``siglip_loss``. Never holds the N x N logits.

    L = -1/N sum_ij log sigmoid(z_ij l_ij),   l_ij = t x_i . y_j + b,
    z_ij = +1 where j == i (the pair), -1 elsewhere; N is the global batch.

Each term depends on its own logit only: no softmax couples a row or a column, so unlike
CLIP (contrastive.py) there are no log-sum-exp statistics to compute, combine across
ranks or keep for the backward. The gradient with respect to the logits is

    G_ij = dL/dl_ij = -(1/N) z_ij sigmoid(-z_ij l_ij) = W_ij / N,   W_ij in [-1, 1],
    dX = t G Y,  dY = t G^T X,  dL/dt = sum_ij G_ij x_i . y_j,  dL/db = sum_ij G_ij.

Two tiled primitives compute it (the SigmoidBackend interface below), in plain torch
(siglip_torch.py, the CPU path) and in Triton (triton_backend/sigmoid_*.py):

    pairwise_sigmoid_loss(X, Y, t, b)                 -> loss_i = sum_j -log sigmoid(z l) (M,)
    pairwise_sigmoid_gradient(X, Y, t, b, out_mult)   -> dX = out_mult W Y (M, D),
                                                         gt_i = sum_j W_ij s_ij, gb_i = sum_j W_ij

Passes, for M local rows of a global batch of N pairs (ranks hold local rows X, Y):

forward   1. loss(X_local, Y_global)                 -> row sums (M); the loss: one scalar
                                                        all-reduce
backward  2. gradient(X_local, Y_global)             -> dX_local, gt, gb (each entry once)
          3. gradient(Y_local, X_global)             -> dY_local (the transposed problem:
             l^T has the same diagonal, so W^T's rows are this pass's W)
          (one process, torch backend: pass 2 also accumulates dY = W^T X; no pass 3)

X_global is gathered only for pass 3, in the backward, so the forward keeps no N x D
copy of it. Each rank gets the complete gradient of its own rows from its own passes;
dL/dt and dL/db are one all-reduce of two numbers. Memory beyond the features and the
gathered columns is O(N): per-row sums, and one tile (torch) or the programs' registers
(Triton).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from megabatch.kernels import siglip_torch

# The input checks and collectives are clip_loss's, so both losses reject the same inputs
# with the same messages.
from megabatch.kernels.contrastive import (
    _all_reduce_sum,
    _as_scale_tensor,
    _check_backend_dtype,
    _check_features,
    _check_group,
    _gather_rows,
    _scale_dtype,
    resolved_backend,
)
from megabatch.kernels.distributed import group_rank_and_size


@runtime_checkable
class SigmoidBackend(Protocol):
    """The two primitives of the module docstring over rows x (M, D) against columns
    y (N, D); row i's partner is column row_offset + i. scale, bias and out_mult are (1,)
    tensors on the features' device, fp32 (fp64 for fp64 features); per-row outputs are
    fp32 (fp64 for fp64 features where supported), dX and dY in the features' dtype."""

    name: str  # as in siglip_loss(..., backend=name)
    supports_column_gradient: bool  # pairwise_sigmoid_gradient(with_col_grad=True) works
    supports_float64: bool

    def pairwise_sigmoid_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        *,
        row_offset: int,
    ) -> torch.Tensor:
        """(M,) loss_i = sum_j softplus(-z_ij (t x_i . y_j + b))."""
        ...

    def pairwise_sigmoid_gradient(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        out_mult: torch.Tensor,
        *,
        row_offset: int,
        with_col_grad: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """(dX, gt, gb), or (dX, gt, gb, dY) with with_col_grad (one process only: dY then
        covers every row): dX = out_mult W Y, dY = out_mult W^T X, gt_i = sum_j W_ij s_ij,
        gb_i = sum_j W_ij, W_ij = -z_ij sigmoid(-z_ij l_ij)."""
        ...


class _FusedSigLIPLoss(torch.autograd.Function):
    """SigLIP over local rows x (M, D) against the gathered columns; see the module
    docstring. scale, bias: (1,) t and b; impl: the SigmoidBackend that runs the passes."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, group, impl):
        y_global, offset, n_global = _gather_rows(y, group)
        row_loss = impl.pairwise_sigmoid_loss(x, y_global, scale, bias, row_offset=offset)
        ctx.save_for_backward(x, y, y_global, scale, bias)
        ctx.group, ctx.impl, ctx.offset, ctx.n_global = group, impl, offset, n_global
        return (_all_reduce_sum(row_loss.sum(), group) / n_global).to(scale.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        x, y, y_global, scale, bias = ctx.saved_tensors
        impl, group, offset = ctx.impl, ctx.group, ctx.offset
        coef = grad_loss.to(scale.dtype) / ctx.n_global  # G = coef * W
        out_mult = (coef * scale).reshape(1)  # dX = t G Y = out_mult * W Y
        if group_rank_and_size(group)[1] == 1 and impl.supports_column_gradient:
            dx, gt, gb, dy = impl.pairwise_sigmoid_gradient(
                x, y_global, scale, bias, out_mult, row_offset=offset, with_col_grad=True
            )
        else:
            dx, gt, gb = impl.pairwise_sigmoid_gradient(
                x, y_global, scale, bias, out_mult, row_offset=offset
            )
            x_global, _, _ = _gather_rows(x, group)
            # The transposed problem's gt and gb repeat pass 2's: dropped.
            dy, _, _ = impl.pairwise_sigmoid_gradient(
                y, x_global, scale, bias, out_mult, row_offset=offset
            )
        # Every rank's pass 2 covers its rows x all columns: together, each entry once.
        sums = _all_reduce_sum(torch.stack([gt.sum(), gb.sum()]).to(scale.dtype), group)
        dscale = (coef * sums[0]).reshape(scale.shape)
        dbias = (coef * sums[1]).reshape(bias.shape)
        return dx, dy, dscale, dbias, None, None


def _select_backend(backend: str, device: torch.device) -> SigmoidBackend | None:
    backend = resolved_backend(backend, device)
    if backend == "torch":
        return siglip_torch.BACKEND
    if backend == "triton":
        from megabatch.kernels.triton_backend import sigmoid  # imports triton only when asked

        return sigmoid.BACKEND
    return None  # reference


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over N (image, text) pairs, fused and tiled.

    image_features, text_features: (N, D), fp32/bf16/fp16 (same dtype; fp64: torch and
    reference backends), used as given: callers L2-normalise the rows, as for clip_loss.
    logit_scale: the multiplier t itself, as clip_loss's logit_scale: a model that learns
    log t (SigLIP's init log 10) passes its exp(). logit_bias: b (SigLIP's init -10).
    Each a float or a scalar tensor, differentiated where it requires grad.
    Returns the fp32 scalar -1/N sum_ij log sigmoid(z_ij (t A_i . B_j + b)) over all N x N
    pairs, z_ij = +1 if i == j else -1 (fp64 for fp64 features).

    process_group and backend: as for clip_loss (with a group, each rank passes its local
    pairs and the result and every gradient equal one process's on all ranks' pairs
    concatenated in rank order; "auto" is triton on CUDA, torch otherwise).
    """
    _check_features("siglip_loss", image_features, text_features)
    scale = _as_scale_tensor("logit_scale", logit_scale)
    bias = _as_scale_tensor("logit_bias", logit_bias)
    impl = _select_backend(backend, image_features.device)
    _check_group("siglip_loss", process_group, backend)
    _check_backend_dtype(impl, image_features)
    if impl is None:
        from megabatch.kernels.reference import siglip_loss_reference

        return siglip_loss_reference(
            image_features, text_features, scale.reshape(()), bias.reshape(())
        )
    dtype = _scale_dtype(image_features)
    scale = scale.reshape(1).to(image_features.device, dtype)
    bias = bias.reshape(1).to(image_features.device, dtype)
    return _FusedSigLIPLoss.apply(image_features, text_features, scale, bias, process_group, impl)


__all__ = ["siglip_loss", "SigmoidBackend"]
