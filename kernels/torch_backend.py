"""The tiled contrastive loss in plain torch: the CPU training path.

Implements ContrastiveBackend (backend.py, which gives the formulas) with the same
arguments as the Triton kernels. S is visited in (TILE_ROWS, TILE_COLS) tiles: the
largest temporary is one tile, whatever N is, and a tile of 1024 x 1024 fp32 (4 MB) stays
in the CPU's last-level cache, where the elementwise work (exp, subtract, ...) runs faster
than on (rows, N) strips streamed from memory. On a GPU the tiles are 4096 x 4096. Row
statistics are merged across column tiles and column statistics across row tiles with
log-add-exp.

One primitive the Triton backend lacks: ``row_gradient(..., with_col_grad=True)`` also
returns dL/dY from the same W tiles (dY += W^T X_rows). On a GPU that would need
cross-program atomics; on a CPU it is a plain accumulation, and it saves CLIP a second
pass over S (3 matrix products in the backward instead of 4).

Accumulation is fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 (gradcheck).
"""

from __future__ import annotations

import torch

from megabatch.kernels.backend import ContrastiveBackend, LossMode

# 1024 x 1024: large enough that the rounds of small per-tile ops are few, small enough
# that the fp32 tile (4 MB) and its temporaries stay in a CPU's last-level cache. The
# timings that chose it: docs/benchmarks.md, "Kernel design measurements".
_TILE_ROWS = 1024
_TILE_COLS = 1024
# On a GPU the torch path's cost is kernel launches (about ten per tile), not cache
# misses: tiles 4 x 4 bigger in each direction (64 MB of fp32 logits) amortise them.
_GPU_TILE_SCALE = 4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positive_columns(rows: torch.Tensor, m: int, row_offset: int, mode: LossMode) -> torch.Tensor:
    if mode == LossMode.CLIP:
        return rows + row_offset
    half = m // 2
    return torch.where(rows < half, rows + half, rows - half) + row_offset


class _Tiling:
    """Index bookkeeping for one (rows r0:r1) x (columns c0:c1) tile of S."""

    def __init__(self, m: int, n: int, row_offset: int, mode: LossMode, device):
        self.m, self.n, self.row_offset, self.mode = m, n, row_offset, mode
        self.rows = torch.arange(m, device=device)
        self.pos = _positive_columns(self.rows, m, row_offset, mode)  # (M,) global column

    def __iter__(self):
        scale = _GPU_TILE_SCALE if self.rows.is_cuda else 1
        tile_rows, tile_cols = _TILE_ROWS * scale, _TILE_COLS * scale
        for r0 in range(0, self.m, tile_rows):
            r1 = min(r0 + tile_rows, self.m)
            for c0 in range(0, self.n, tile_cols):
                yield r0, r1, c0, min(c0 + tile_cols, self.n)

    def self_entries(self, r0, r1, c0, c1):
        """(tile rows, tile cols) of S_ii (a view against itself) inside the tile, NT-Xent."""
        lo, hi = max(r0, c0 - self.row_offset), min(r1, c1 - self.row_offset)
        if self.mode != LossMode.NTXENT or lo >= hi:
            return None
        i = torch.arange(lo, hi, device=self.rows.device)
        return i - r0, i + self.row_offset - c0

    def positive_entries(self, r0, r1, c0, c1):
        """(tile rows, tile cols) of the positives that fall inside the tile."""
        pos = self.pos[r0:r1]
        inside = ((pos >= c0) & (pos < c1)).nonzero().squeeze(1)
        return inside, pos[inside] - c0


class _ScaledRows:
    """s * x[r0:r1] in the compute dtype, for the tiles of one row block: s is folded into
    the rows (R x D multiplies) rather than the tiles (R x C), and only the current row
    block is held, not an (M, D) scaled copy of x."""

    def __init__(self, x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.x, self.scale, self.dtype = x, scale.to(dtype), dtype
        self.r0, self.block = -1, None

    def __call__(self, r0: int, r1: int) -> torch.Tensor:
        if r0 != self.r0:  # tiles come row block by row block (_Tiling's order)
            self.r0, self.block = r0, self.x[r0:r1].to(self.dtype) * self.scale
        return self.block


def row_logsumexp(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    *,
    row_offset: int,
    mode: LossMode,
    with_col: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ContrastiveBackend.row_logsumexp: lse_row (M,), positive (M,), col_lse (N,) or None."""
    m, n = x.shape[0], y.shape[0]
    dtype = _compute_dtype(x.dtype)
    y_t = y.to(dtype).t()  # (D, N)
    tiling = _Tiling(m, n, row_offset, mode, x.device)
    scaled_rows = _ScaledRows(x, scale, dtype)
    lse_row = torch.full((m,), float("-inf"), device=x.device, dtype=dtype)
    positive = torch.empty(m, device=x.device, dtype=dtype)
    col = torch.full((n,), float("-inf"), device=x.device, dtype=dtype) if with_col else None
    for r0, r1, c0, c1 in tiling:
        s = scaled_rows(r0, r1) @ y_t[:, c0:c1]  # (R, C) logits
        diag = tiling.self_entries(r0, r1, c0, c1)
        if diag is not None:
            s[diag] = float("-inf")
        hit_rows, hit_cols = tiling.positive_entries(r0, r1, c0, c1)
        positive[r0 + hit_rows] = s[hit_rows, hit_cols]
        tile_row, tile_col = _tile_logsumexps(s, with_col)
        lse_row[r0:r1] = torch.logaddexp(lse_row[r0:r1], tile_row)
        if with_col:
            col[c0:c1] = torch.logaddexp(col[c0:c1], tile_col)
    return lse_row, positive, col


# A column sum computed from the rows' exponentials is trusted down to this (in units of
# the tile's largest exp): see _tile_logsumexps.
_MIN_SHARED_COLUMN_SUM = 2.0**-64


def _tile_logsumexps(s: torch.Tensor, with_col: bool):
    """(R,) row and, if with_col, (C,) column log-sum-exps of one (R, C) tile of logits,
    with one exp per logit: the columns reuse the rows' E_ij = exp(S_ij - m_i),

        sum_i exp(S_ij - t) = (f^T E)_j,   f_i = exp(m_i - t),  t = max_i m_i,

    a matrix-vector product instead of a second pass of exps. Terms lost to underflow are
    each below fp32's smallest normal (relative to exp(t)), so a column sum of at least
    2^-64 is exact to ~2^-55; smaller ones (a column about 44 or more below the tile's
    top logit) are recomputed with their own max."""
    top = s.amax(dim=1)  # (R,); -inf for a row with every entry masked (NT-Xent)
    shift = top.nan_to_num(neginf=0.0)  # such a row: e = 0, its lse log(0) = -inf
    e = torch.sub(s, shift[:, None]).exp_()
    rows = e.sum(dim=1).log_().add_(shift)
    if not with_col:
        return rows, None
    t = top.max().nan_to_num(neginf=0.0)
    col_sum = torch.sub(top, t).exp_() @ e  # (C,)
    cols = col_sum.log().add_(t)
    low = col_sum < _MIN_SHARED_COLUMN_SUM
    if low.any():
        cols[low] = torch.logsumexp(s[:, low], dim=0)
    return rows, cols


def row_gradient(
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
):
    """dX (M, D), gs (M,) and, if with_col_grad, dY (N, D) = out_mult * W^T X."""
    m, n = x.shape[0], y.shape[0]
    dtype = _compute_dtype(x.dtype)
    x_c = x.to(dtype)
    y_c = y.to(dtype)
    y_t = y_c.t()
    lse_row, lse_col = lse_row.to(dtype), lse_col.to(dtype)
    tiling = _Tiling(m, n, row_offset, mode, x.device)
    scaled_rows = _ScaledRows(x_c, scale, dtype)
    dx = torch.zeros(m, x.shape[1], device=x.device, dtype=dtype)
    dy = torch.zeros(n, y.shape[1], device=x.device, dtype=dtype) if with_col_grad else None
    gs = torch.zeros(m, device=x.device, dtype=dtype)
    for r0, r1, c0, c1 in tiling:
        s = scaled_rows(r0, r1) @ y_t[:, c0:c1]  # (R, C) logits, recomputed
        # W = P_row + P_col - 2 [positive]; NT-Xent's self entries are set to 0 below.
        w = torch.sub(s, lse_row[r0:r1, None]).exp_()
        w.add_(torch.sub(s, lse_col[None, c0:c1]).exp_())
        hit_rows, hit_cols = tiling.positive_entries(r0, r1, c0, c1)
        w[hit_rows, hit_cols] -= 2.0
        diag = tiling.self_entries(r0, r1, c0, c1)
        if diag is not None:
            w[diag] = 0.0
        gs[r0:r1] += torch.linalg.vecdot(w, s)
        dx[r0:r1].addmm_(w, y_c[c0:c1])
        if with_col_grad:
            dy[c0:c1].addmm_(w.t(), x_c[r0:r1])
    mult = out_mult.to(dtype)
    dx = dx.mul_(mult).to(x.dtype)
    if with_col_grad:
        dy = dy.mul_(mult).to(y.dtype)
    gs = gs if dtype == torch.float64 else gs.float()
    return (dx, gs, dy) if with_col_grad else (dx, gs)


class _TorchBackend:
    """ContrastiveBackend in plain torch (any device, fp64 included)."""

    name = "torch"
    supports_column_gradient = True
    supports_float64 = True
    row_logsumexp = staticmethod(row_logsumexp)
    row_gradient = staticmethod(row_gradient)


BACKEND: ContrastiveBackend = _TorchBackend()
