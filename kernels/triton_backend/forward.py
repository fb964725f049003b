"""The forward pass: row (and CLIP's column) log-sum-exps and the positive logits.

_row_logsumexp_kernel, its autotune configs, and its launcher row_logsumexp
(ContrastiveBackend.row_logsumexp; the maths in megabatch.kernels.backend).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megabatch.kernels.backend import LossMode
from megabatch.kernels.triton_backend import common
from megabatch.kernels.triton_backend.common import (
    DYNAMIC_INTS,
    INTERPRETED,
    NTXENT,
    WHOLE_ROWS,
    check_runnable,
    d_pad,
    device_key,
    input_precision,
    load_rows,
    log2_fast,
    logits_tile_log2,
    make_config,
    n_bucket,
    num_sms,
    positive_column,
    prune_configs,
    quick_bench,
)

# A column sum computed from the row pass's exponentials is trusted down to 2^-64 (in
# units of the tile's largest exp2): see _column_log2sumexp2_shared.
_MIN_SHARED_COLUMN_SUM = tl.constexpr(2.0**-64)


@triton.jit
def _column_log2sumexp2(s):
    """log2 sum_i exp2(s_ij) of each column of one (BLOCK_M, BLOCK_N) tile of logits (log2
    units; masked entries -inf), shifted by each column's own max."""
    c_max = tl.max(s, axis=0)
    c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
    return c_safe + log2_fast(tl.sum(tl.exp2(s - c_safe[None, :]), axis=0))


@triton.jit
def _column_log2sumexp2_shared(s, e, tile_max, col_ok):
    """_column_log2sumexp2 from the row pass's e_ij = exp2(s_ij - tile_max_i):

        sum_i exp2(s_ij - t) = sum_i e_ij * exp2(tile_max_i - t),   t = max_i tile_max_i,

    one multiply per logit where the column's own max would cost a second exp2 and a
    max reduced across warps. Every term lost to underflow (e_ij, or a row's weight,
    below fp32's 2^-126) is under 2^-126, so a column sum of at least 2^-64 is accurate
    to ~2^-55 relative. A tile with a smaller column sum (a column whose largest logit is
    about 44 or more below the tile's top) is redone with each column's own max.
    """
    t = tl.max(tile_max)
    t = tl.where(t == float("-inf"), 0.0, t)
    row_weight = tl.exp2(tile_max - t)  # (BLOCK_M,) <= 1; 0 for rows masked out
    col_sum = tl.sum(e * row_weight[:, None], axis=0)  # (BLOCK_N,)
    if tl.min(tl.where(col_ok, col_sum, 1.0)) >= _MIN_SHARED_COLUMN_SUM:
        tile_lse = t + log2_fast(col_sum)
    else:
        tile_lse = _column_log2sumexp2(s)
    return tile_lse


@triton.jit(do_not_specialize=DYNAMIC_INTS)
def _row_logsumexp_kernel(
    X,  # (M, D) rows
    Y,  # (N, D) columns
    SCALE,  # (1,) fp32 logit multiplier s
    LSE_ROW,  # (M,) fp32 out: natural-log logsumexp of each row
    POSITIVE,  # (M,) fp32 out: S[i, pos(i)], the positive logit of each row
    COL_PART,  # (P_alloc, N) fp32 out (WITH_COL): log2-sum-exp2 of each column over this program's rows
    M,
    N,
    D,
    stride_x,
    stride_y,
    row_offset,
    N_BUCKET,  # autotune key only: log2 of N, capped, so a shape class is tuned once
    DEVICE_KEY,  # autotune key only: the GPU model (device_key), so no other model reuses it
    MODE: tl.constexpr,
    WITH_COL: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_EXP: tl.constexpr,  # config: columns reuse the rows' exp2s (_column_log2sumexp2_shared)
    INPUT_PRECISION: tl.constexpr,
):
    # One pass over S computes both directions' statistics:
    #   rows: online (running max m_i, running sum l_i) along each row of the row block;
    #   columns (WITH_COL): per tile, the column's log-sum-exp over the BLOCK_M rows, merged
    #   into this program's own row of COL_PART (no other program writes it, so no atomics).
    # The grid is persistent: program p takes row blocks p, p + P, ... so COL_PART needs
    # only P rows (P ~ number of SMs), i.e. O(P * N) memory rather than O(N^2 / BLOCK_M).
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    scale_log2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    half = M // 2
    ks = tl.arange(0, D_PAD)
    for row_block in range(pid, tl.cdiv(M, BLOCK_M), num_programs):
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if BLOCK_K >= D_PAD:  # whole rows: X's block stays on chip for the whole sweep
            x = load_rows(X, rows, M, ks, D, stride_x)  # (BLOCK_M, D_PAD)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # The positive logit is read off the same tiles (same rounding as the lse, and no
        # O(M D) temporaries for a separate dot product); only tiles holding one look.
        pos = positive_column(rows, row_offset, half, MODE)
        pos_lo = tl.min(tl.where(row_ok, pos, N))
        pos_hi = tl.max(tl.where(row_ok, pos, -1))
        p_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for col_start in range(0, N, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            if BLOCK_K >= D_PAD:
                y = load_rows(Y, cols, N, ks, D, stride_y)  # (BLOCK_N, D_PAD)
                s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION) * scale_log2
            else:
                s = logits_tile_log2(
                    X, Y, rows, cols, M, N, D, stride_x, stride_y, scale_log2,
                    BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
                )  # fmt: skip
            valid = row_ok[:, None] & col_ok[None, :]
            if MODE == NTXENT:  # a view is never its own negative
                valid = valid & (cols[None, :] != (rows + row_offset)[:, None])
            s = tl.where(valid, s, float("-inf"))

            # Rows: rescale the running sum to the new running max. A row whose tile is
            # fully masked keeps m = -inf; subtracting 0 instead avoids (-inf) - (-inf).
            tile_max = tl.max(s, axis=1)  # (BLOCK_M,)
            m_new = tl.maximum(m_i, tile_max)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            if WITH_COL and ONE_EXP:
                # The tile's own row maxima shift its exp2s, so the columns can reuse
                # them; the tile's (max, sum) joins (m_i, l_i) by log-add-exp (a fully
                # masked row: shift 0, adds 0 * exp2(-inf) = 0).
                e = tl.exp2(s - tl.where(tile_max == float("-inf"), 0.0, tile_max)[:, None])
                tile_sum = tl.sum(e, axis=1) * tl.exp2(tile_max - m_safe)
            else:
                tile_sum = tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
            l_i = l_i * tl.exp2(m_i - m_safe) + tile_sum
            m_i = m_new

            if (col_start <= pos_hi) & (col_start + BLOCK_N > pos_lo):
                p_i += tl.sum(tl.where(cols[None, :] == pos[:, None], s, 0.0), axis=1)

            if WITH_COL:
                if ONE_EXP:
                    tile_lse = _column_log2sumexp2_shared(s, e, tile_max, col_ok)
                else:
                    tile_lse = _column_log2sumexp2(s)
                part = COL_PART + pid * N + cols
                old = tl.load(part, mask=col_ok, other=float("-inf"))
                hi = tl.maximum(old, tile_lse)
                hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
                merged = hi_safe + log2_fast(tl.exp2(old - hi_safe) + tl.exp2(tile_lse - hi_safe))
                tl.store(part, merged, mask=col_ok)
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
        tl.store(LSE_ROW + rows, lse, mask=row_ok)
        tl.store(POSITIVE + rows, p_i * 0.6931471805599453, mask=row_ok)


# --------------------------------------------------------------------------- tuning
# What bounds the candidates, for bf16 and D_PAD = 512:
#   K-chunked: (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes of shared memory per pipeline stage;
#   whole rows: X's block, BLOCK_M * 1 KB, plus BLOCK_N * 1 KB per stage.
def _fwd_config(block_m, block_n, block_k, warps, stages, one_exp=False):
    return make_config(block_m, block_n, block_k, warps, stages, ONE_EXP=one_exp)


# ONE_EXP (the columns reuse the rows' exp2s, with a per-tile branch back to their own
# where that would be inexact) is offered on the two configs that were fastest without
# it (docs/benchmarks-passes.md). Compiled for sm_90a (python -m
# megabatch.kernels.hopper_compile) they run fewer instructions and MUFU ops than their
# twins but use more registers and hold a branch (the counts: docs/benchmarks.md,
# "Kernel design measurements"): whether that is faster, the autotuner finds out on the
# GPU.
_FWD_CONFIGS = [
    # K-chunked
    _fwd_config(128, 128, 64, 8, 3),
    _fwd_config(128, 128, 64, 8, 4),
    _fwd_config(128, 128, 128, 8, 3),
    _fwd_config(128, 64, 64, 4, 4),
    _fwd_config(64, 64, 64, 4, 3),
    _fwd_config(128, 128, 64, 8, 3, one_exp=True),
    _fwd_config(128, 128, 64, 8, 4, one_exp=True),
    # whole rows
    _fwd_config(64, 64, WHOLE_ROWS, 4, 2),
    _fwd_config(64, 32, WHOLE_ROWS, 4, 3),
    _fwd_config(128, 32, WHOLE_ROWS, 8, 2),
    _fwd_config(128, 64, WHOLE_ROWS, 8, 1),
]
_MIN_FWD_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _FWD_CONFIGS)
_INTERPRET_ONE_EXP = True  # interpreter; tests switch it off to run the other column path

_row_logsumexp_tuned = triton.autotune(
    _FWD_CONFIGS,
    key=["D", "N_BUCKET", "DEVICE_KEY", "MODE", "WITH_COL", "INPUT_PRECISION"],  # + dtypes
    prune_configs_by={"early_config_prune": prune_configs},
    restore_value=["COL_PART"],
    do_bench=quick_bench,
)(_row_logsumexp_kernel)


# --------------------------------------------------------------------------- launcher
def row_logsumexp(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    *,
    row_offset: int,
    mode: LossMode,
    with_col: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """lse_row (M,), positive logits (M,) and, if with_col, these rows' column lse (N,)."""
    check_runnable(x)
    x, y = x.contiguous(), y.contiguous()
    m, d = x.shape
    n = y.shape[0]
    lse_row = torch.empty(m, device=x.device, dtype=torch.float32)
    positive = torch.empty(m, device=x.device, dtype=torch.float32)
    if INTERPRETED:
        blocks = {**common.INTERPRET_BLOCKS, "ONE_EXP": _INTERPRET_ONE_EXP}
        programs = triton.cdiv(m, blocks["BLOCK_M"])
        if with_col:
            programs = min(programs, 4)
    else:
        blocks = {}
        programs = triton.cdiv(m, _MIN_FWD_BLOCK_M)
        if with_col:
            programs = min(programs, num_sms(x.device.index or 0))
    # One partial row per program; programs left without rows keep -inf, which the
    # final log-sum-exp over programs ignores.
    col_part = torch.full(
        (programs if with_col else 1, n if with_col else 1),
        float("-inf"),
        device=x.device,
        dtype=torch.float32,
    )

    def grid(meta):
        return (min(triton.cdiv(m, meta["BLOCK_M"]), programs),)

    kernel = _row_logsumexp_kernel if INTERPRETED else _row_logsumexp_tuned
    kernel[grid](
        x,
        y,
        scale,
        lse_row,
        positive,
        col_part,
        m,
        n,
        d,
        x.stride(0),
        y.stride(0),
        row_offset,
        n_bucket(n),
        device_key(x),
        MODE=int(mode),
        WITH_COL=with_col,
        D_PAD=d_pad(d),
        INPUT_PRECISION=input_precision(x.dtype),
        **blocks,
    )
    if not with_col:
        return lse_row, positive, None
    return lse_row, positive, _merge_column_partials_(col_part)


def _merge_column_partials_(col_part: torch.Tensor) -> torch.Tensor:
    """(P, N) per-program column log2-sum-exp2s -> (N,) natural-log column lse.

    In place: torch.logsumexp would allocate a (P, N) temporary, which at P = 132 and
    N = 65,536 doubles the forward's 35 MB of scratch."""
    top = col_part.amax(dim=0)  # (N,); -inf only where no program saw the column
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    total = col_part.sub_(top).exp2_().sum(dim=0)
    return total.log2_().add_(top).mul_(math.log(2.0))
