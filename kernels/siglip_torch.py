"""SigLIP's two tiled primitives in plain torch: the CPU path of kernels.siglip.

For rows X (M, D) against columns Y (N, D), with s_ij = x_i . y_j, the logits
l_ij = t s_ij + b, z_ij = +1 where column j is row i's partner (global column
row_offset + i) and -1 elsewhere, and the flipped logit m_ij = -z_ij l_ij:

    pairwise_sigmoid_loss:      loss_i = sum_j softplus(m_ij)     (= -log sigmoid(z_ij l_ij))
    pairwise_sigmoid_gradient:  W_ij = -z_ij sigmoid(m_ij)        (= N dL/dl_ij, in [-1, 1])
                                dX = out_mult * W Y                (out_mult = g t / N)
                                dY = out_mult * W^T X              (with_col_grad)
                                gt_i = sum_j W_ij s_ij,  gb_i = sum_j W_ij   (dL/dt, dL/db)

Unlike the softmax losses nothing couples the entries of a row, so there are no row or
column statistics: the forward is one pass of sums and the backward recomputes each tile
of l. S is visited in torch_backend's tiles (1024 x 1024 on a CPU: one fp32 tile and its
temporaries stay in the last-level cache), so the largest temporary is one tile whatever
N is. Only z's +1 entries, at most one a row, differ from the rest: the tile is computed
as if z were -1 everywhere and those entries are fixed up (O(tile rows) work).

Accumulation is fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 (gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megabatch.kernels.backend import LossMode

# The tiling, the row block scaled once per block, and the compute dtype are the CLIP
# path's (torch_backend): the same tile sizes (which tests shrink there) serve both.
from megabatch.kernels.torch_backend import _compute_dtype, _ScaledRows, _Tiling


def _flipped_logits(scaled_rows, y_t, bias, tiling, r0, r1, c0, c1):
    """m = -z * (t X Y^T + b) on tile (r0:r1, c0:c1), (R, C), and its partners' positions."""
    flipped = torch.addmm(bias, scaled_rows(r0, r1), y_t[:, c0:c1])  # l: m where z = -1
    # CLIP's positives are exactly SigLIP's z = +1 entries: global column row_offset + i.
    partners = tiling.positive_entries(r0, r1, c0, c1)
    flipped[partners] = -flipped[partners]
    return flipped, partners


def pairwise_sigmoid_loss(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, row_offset: int
) -> torch.Tensor:
    """(M,) loss_i = sum_j softplus(-z_ij (t x_i . y_j + b)), fp32 (fp64 for fp64 inputs)."""
    m, n = x.shape[0], y.shape[0]
    dtype = _compute_dtype(x.dtype)
    y_t = y.to(dtype).t()  # (D, N)
    bias = bias.to(dtype)
    tiling = _Tiling(m, n, row_offset, LossMode.CLIP, x.device)
    scaled_rows = _ScaledRows(x, scale, dtype)
    # F.softplus is log1p(exp(m)) up to the threshold and m itself above it, where the
    # rest, exp(-m), is below the dtype's rounding of m: no overflow for any t or b.
    threshold = 40.0 if dtype == torch.float64 else 20.0
    row_loss = torch.zeros(m, device=x.device, dtype=dtype)
    for r0, r1, c0, c1 in tiling:
        flipped, _ = _flipped_logits(scaled_rows, y_t, bias, tiling, r0, r1, c0, c1)
        row_loss[r0:r1] += F.softplus(flipped, threshold=threshold).sum(dim=1)
    return row_loss


def pairwise_sigmoid_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    out_mult: torch.Tensor,
    *,
    row_offset: int,
    with_col_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(dX (M, D), gt (M,), gb (M,)), or (dX, gt, gb, dY (N, D)) with with_col_grad.

    dX = out_mult * W Y and dY = out_mult * W^T X in the features' dtype; gt, gb fp32
    (fp64 for fp64 inputs): the module docstring's formulas."""
    m, n = x.shape[0], y.shape[0]
    dtype = _compute_dtype(x.dtype)
    x_c, y_c = x.to(dtype), y.to(dtype)
    y_t = y_c.t()
    bias = bias.to(dtype)
    tiling = _Tiling(m, n, row_offset, LossMode.CLIP, x.device)
    scaled_rows = _ScaledRows(x_c, scale, dtype)
    w_y = torch.zeros(m, x.shape[1], device=x.device, dtype=dtype)  # W Y, unscaled
    dy = torch.zeros(n, y.shape[1], device=x.device, dtype=dtype) if with_col_grad else None
    gb = torch.zeros(m, device=x.device, dtype=dtype)
    for r0, r1, c0, c1 in tiling:
        w, partners = _flipped_logits(scaled_rows, y_t, bias, tiling, r0, r1, c0, c1)
        w = w.sigmoid_()  # sigmoid(m), in [0, 1]: no overflow for any t or b
        w[partners] = -w[partners]  # W = -z sigmoid(m)
        gb[r0:r1] += w.sum(dim=1)
        w_y[r0:r1].addmm_(w, y_c[c0:c1])
        if with_col_grad:
            dy[c0:c1].addmm_(w.t(), x_c[r0:r1])
    # gt_i = sum_j W_ij x_i . y_j = x_i . (W Y)_i: O(M D) once, not a pass over every tile.
    # As M dot products of length D (bmm): linalg.vecdot would allocate an (M, D) product.
    gt = torch.bmm(x_c.unsqueeze(1), w_y.unsqueeze(2)).view(m)
    mult = out_mult.to(dtype)
    dx = w_y.mul_(mult).to(x.dtype)
    if with_col_grad:
        dy = dy.mul_(mult).to(y.dtype)
    return (dx, gt, gb, dy) if with_col_grad else (dx, gt, gb)


class _TorchSigmoidBackend:
    """kernels.siglip.SigmoidBackend in plain torch (any device, fp64 included)."""

    name = "torch"
    # dY from the row pass is a plain accumulation here (one process: all of Y's rows).
    supports_column_gradient = True
    supports_float64 = True
    pairwise_sigmoid_loss = staticmethod(pairwise_sigmoid_loss)
    pairwise_sigmoid_gradient = staticmethod(pairwise_sigmoid_gradient)


BACKEND = _TorchSigmoidBackend()
