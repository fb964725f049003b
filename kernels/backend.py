"""The interface every fused-loss backend implements, and the loss modes.

Both losses reduce to two primitives over a block of *rows* X (M, D) against all
*columns* Y (N, D), with logits S = s * X Y^T computed tile by tile and never stored:

    row_logsumexp:  lse_row[i] = log sum_j exp(S_ij)               (online, per row block)
                    positive[i] = S_i,pos(i)                         (the positive's logit)
                    col_lse[j] = log sum_i exp(S_ij) over these rows (optional, CLIP)
    row_gradient:   W_ij = exp(S_ij - lse_row[i]) + exp(S_ij - lse_col[j]) - 2 [j == pos(i)]
                    dX_i = out_mult * sum_j W_ij Y_j                (out_mult = g * s / (2 N))
                    gs_i = sum_j W_ij S_ij                           (for d loss / d s)

W / (2N) is the symmetrised gradient of the loss with respect to S (docs/ARCHITECTURE.md,
"Fused contrastive loss"): CLIP's dL/dA is the row pass over (A, B) and dL/dB the same row
pass over (B, A) with the two log-sum-exp vectors swapped; NT-Xent's S is symmetric, so
one row pass over (Z, Z) gives the whole dL/dZ. In NT-Xent mode the diagonal S_ii (a view
against itself) is excluded from every sum.

Row i of X has global index row_offset + i among the columns (ranks hold local rows
against gathered columns). Its positive column pos(i) is
    CLIP:    row_offset + i
    NT-Xent: row_offset + (i + HALF) % (2 HALF)     (X = [z1; z2], HALF = M / 2 rows each)

Implementations: torch_backend.BACKEND (plain torch, the CPU path) and
triton_backend.BACKEND (Triton kernels); contrastive.py picks one and runs the passes.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import torch


class LossMode(enum.IntEnum):
    """Which loss a pass computes: where each row's positive is, and whether S_ii counts.

    The values are what the Triton kernels take as their MODE constexpr (int(mode))."""

    CLIP = 0  # rows are images, columns texts: pos(i) = row_offset + i
    NTXENT = 1  # rows and columns are the 2N views [z1; z2]; S_ii excluded


@runtime_checkable
class ContrastiveBackend(Protocol):
    """The two tiled primitives of the module docstring; no N x N tensor is ever held.

    Shapes: x (M, D) rows, y (N, D) columns, same dtype and device; scale and out_mult (1,)
    tensors on that device (fp32, fp64 for fp64 features); statistics are fp32 (fp64 for
    fp64 features where supported), in natural-log units.
    """

    name: str  # as in clip_loss(..., backend=name)
    # row_gradient(with_col_grad=True) also returns dL/dY from the same pass, which saves
    # CLIP its second backward pass (one process only: dY then covers every row).
    supports_column_gradient: bool
    supports_float64: bool

    def row_logsumexp(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        *,
        row_offset: int,
        mode: LossMode,
        with_col: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(lse_row (M,), positive (M,), col_lse (N,) or None).

        lse_row[i] = log sum_j exp(S_ij), positive[i] = S_i,pos(i), and with with_col
        col_lse[j] = log sum_i exp(S_ij) over these M rows only (ranks combine theirs)."""
        ...

    def row_gradient(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        out_mult: torch.Tensor,
        lse_row: torch.Tensor,
        lse_col: torch.Tensor,
        *,
        row_offset: int,
        mode: LossMode,
        with_col_grad: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """(dX (M, D), gs (M,)), or (dX, gs, dY (N, D)) with with_col_grad.

        lse_row (M,) is these rows' log-sum-exp, lse_col (N,) each column's over *all*
        rows of the loss. dX = out_mult * W Y, gs_i = sum_j W_ij S_ij, dY = out_mult * W^T X;
        dX and dY in the features' dtype. with_col_grad=True needs supports_column_gradient.
        """
        ...
