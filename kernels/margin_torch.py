"""The margin contrastive loss's negative pairs, tiled, in plain torch (any device).

Rows X (M, D) against columns Y (N, D): row i's partner is column row_offset + i (the
positive, left to margin.py), every other column a negative. The M x N distances are
visited in the same (R, C) tiles as torch_backend (1024 x 1024 on a CPU, 4096 x 4096 on
a GPU); only one tile exists at a time, and both passes are a few in-place operations on
that one buffer:

    D^2 = |x_i|^2 + |y_j|^2 - 2 x_i . y_j, clamped at 0   (rounding can make it < 0)
          one addmm (|y_j|^2 as its bias) and one add

    forward   sum_ij h_ij^2 = sum_ij min(0, D_ij - m)^2          (h = max(0, m - D))
    backward  w_ij = h_ij / D_ij = m max(0, 1 / D_ij - 1 / m), since
              d/dx_i (1/2 h_ij^2) = -h_ij (x_i - y_j) / D_ij = -w_ij (x_i - y_j):
              dX_i = mult * sum_j w_ij (y_j - x_i) = mult * ((W Y)_i   - rowsum(W)_i x_i)
              dY_j = mult * sum_i w_ij (x_i - y_j) = mult * ((W^T X)_j - colsum(W)_j y_j)
              (the tiles hold W / m; the factor m goes into mult)

with the positives' entries set to 0 in both. The row and column sums of W are
matrix-vector products (one read of the tile each).

D_ij = 0 (x_i = y_j exactly): the direction (x_i - y_j) / D_ij is undefined there, and the
gradient is defined as 0, which lies in the Clarke subdifferential (the ball of radius m):
1 / D = inf there, and W's infinities are set to 0. No eps is added. D^2 from the
expansion carries an absolute rounding error of about eps (|x_i|^2 + |y_j|^2) (eps =
2^-24 in fp32), so distances below about sqrt(eps) |x| (3e-4 for unit rows) are rounding
noise, and so is their gradient's direction; its size stays at most m a pair.

Accumulation is fp32 for fp32/bf16/fp16 features and fp64 for fp64; results are returned
in that compute dtype (margin.py adds the positives' terms and casts).
"""

from __future__ import annotations

import torch

from megabatch.kernels.backend import LossMode
from megabatch.kernels.torch_backend import _compute_dtype, _Tiling


def _tiling(m: int, n: int, row_offset: int, device) -> _Tiling:
    # CLIP's pairing: row i's positive is column row_offset + i. The tile sizes are
    # torch_backend's (_TILE_ROWS, _TILE_COLS), which the tests shrink.
    return _Tiling(m, n, row_offset, LossMode.CLIP, device)


class _Operands:
    """x, y in the compute dtype (no copy for fp32/fp64) and their squared row norms,
    (M,) and (N,): what every tile of D^2 reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        dtype = _compute_dtype(x.dtype)
        self.x, self.y = x.to(dtype), y.to(dtype)
        self.sq_x, self.sq_y = self.x.square().sum(dim=1), self.y.square().sum(dim=1)

    def squared_distances(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """(R, C) D^2 of the tile, clamped at 0."""
        d2 = torch.addmm(self.sq_y[None, c0:c1], self.x[r0:r1], self.y[c0:c1].t(), alpha=-2)
        return d2.add_(self.sq_x[r0:r1, None]).clamp_min_(0)


def _zero_positives(t: torch.Tensor, tiling: _Tiling, r0: int, r1: int, c0: int, c1: int):
    hit_rows, hit_cols = tiling.positive_entries(r0, r1, c0, c1)
    t[hit_rows, hit_cols] = 0


def negative_hinge_sum(
    x: torch.Tensor, y: torch.Tensor, margin: float, *, row_offset: int
) -> torch.Tensor:
    """sum over rows i and columns j != row_offset + i of max(0, m - D_ij)^2.

    x (M, D) rows, y (N, D) columns; a 0-dim tensor in the compute dtype."""
    ops = _Operands(x, y)
    tiling = _tiling(x.shape[0], y.shape[0], row_offset, x.device)
    total = torch.zeros((), dtype=ops.x.dtype, device=x.device)
    for r0, r1, c0, c1 in tiling:
        # min(0, D - m) = -h: the sign goes in the square.
        h = ops.squared_distances(r0, r1, c0, c1).sqrt_().sub_(margin).clamp_max_(0)
        _zero_positives(h, tiling, r0, r1, c0, c1)
        flat = h.view(-1)
        total += flat.dot(flat)
    return total


def negative_hinge_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    margin: float,
    mult: torch.Tensor,
    *,
    row_offset: int,
    with_col_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of mult * 1/2 sum_ij h_ij^2 (the pairs of negative_hinge_sum).

    x (M, D) rows, y (N, D) columns, mult a (1,) or 0-dim tensor. Returns dX (M, D) and,
    with with_col_grad, dY (N, D) (else None), in the compute dtype. dY from one process
    covers only these rows' pairs: ranks instead run a second pass with the roles swapped.
    """
    ops = _Operands(x, y)
    m, n = x.shape[0], y.shape[0]
    tiling = _tiling(m, n, row_offset, x.device)
    dx = torch.zeros_like(ops.x)
    w_rows = ops.x.new_zeros(m)  # (M,) rowsum(W)
    dy = torch.zeros_like(ops.y) if with_col_grad else None
    w_cols = ops.y.new_zeros(n) if with_col_grad else None  # (N,) colsum(W)
    ones = ops.x.new_ones(max(m, n))
    for r0, r1, c0, c1 in tiling:
        # W / m = max(0, 1 / D - 1 / m), (R, C)
        w = ops.squared_distances(r0, r1, c0, c1).rsqrt_().sub_(1 / margin).clamp_min_(0)
        # D = 0 gave inf: 0 by definition (NaN features stay NaN).
        w.nan_to_num_(nan=float("nan"), posinf=0.0)
        _zero_positives(w, tiling, r0, r1, c0, c1)
        w_rows[r0:r1].addmv_(w, ones[: c1 - c0])
        dx[r0:r1].addmm_(w, ops.y[c0:c1])
        if with_col_grad:
            w_cols[c0:c1].addmv_(w.t(), ones[: r1 - r0])
            dy[c0:c1].addmm_(w.t(), ops.x[r0:r1])
    mult = mult.to(ops.x.dtype) * margin  # the tiles held W / m
    dx.addcmul_(w_rows[:, None], ops.x, value=-1).mul_(mult)
    if with_col_grad:
        dy.addcmul_(w_cols[:, None], ops.y, value=-1).mul_(mult)
    return dx, dy
