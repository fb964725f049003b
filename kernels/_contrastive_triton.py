"""Triton kernels for the fused contrastive loss (CLIP's InfoNCE, SimCLR's NT-Xent).

Both losses reduce to two primitives over a block of *rows* X (M, D) against all
*columns* Y (N, D), with logits S = s * X Y^T computed tile by tile and never stored:

    row_logsumexp:  lse_row[i] = log sum_j exp(S_ij)               (online, per row block)
                    positive[i] = S_i,pos(i)                         (the positive's logit)
                    col_lse[j] = log sum_i exp(S_ij) over these rows (optional, CLIP)
    row_gradient:   W_ij = exp(S_ij - lse_row[i]) + exp(S_ij - lse_col[j]) - 2 [j == pos(i)]
                    dX_i = out_mult * sum_j W_ij Y_j                (out_mult = g * s / (2 N))
                    gs_i = sum_j W_ij S_ij                           (for d loss / d s)

W / (2N) is the symmetrised gradient of the loss with respect to S (DESIGN.md section 4):
CLIP's dL/dA is the row pass over (A, B) and dL/dB the same row pass over (B, A) with
the two log-sum-exp vectors swapped; NT-Xent's S is symmetric, so one row pass over
(Z, Z) gives the whole dL/dZ. In NT-Xent mode the diagonal S_ii (a view against
itself) is excluded from every sum.

Row i of X has global index row_offset + i among the columns (ranks hold local rows
against gathered columns). Its positive column pos(i) is
    CLIP:    row_offset + i
    NT-Xent: row_offset + (i + HALF) % (2 HALF)     (X = [z1; z2], HALF rows each)

Exponentials are taken base 2 (exp2 is one hardware instruction): logits are carried
as S * log2(e) and log-sum-exps converted back to natural log on the way out.

On CPU tensors the kernels run under Triton's interpreter, which must be switched on
with TRITON_INTERPRET=1 before this module is imported (tests do this).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

LOG2E = math.log2(math.e)
MODE_CLIP = 0
MODE_NTXENT = 1
# dL/dY from the row pass would need atomics across programs; CLIP runs a second pass.
SUPPORTS_COLUMN_GRADIENT = False

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Set to 1 to run the backward through the experimental TMA + warp-specialised kernel
# (_row_gradient_tma_kernel) wherever TMA can read the features; read at each call.
TMA_BACKWARD_ENV = "MEGABATCH_TRITON_WS"


@triton.jit
def _logits_tile_log2(
    X,  # (M, D) rows, row stride stride_x
    Y,  # (N, D) columns, row stride stride_y
    rows,  # (BLOCK_M,) row indices of this tile
    cols,  # (BLOCK_N,) column indices of this tile
    M,
    N,
    D,
    stride_x,
    stride_y,
    scale_log2,  # s * log2(e), fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """S[rows, cols] * log2(e) as a (BLOCK_M, BLOCK_N) fp32 tile; out-of-range entries are 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows < M
    col_ok = cols < N
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        x = tl.load(
            X + rows[:, None] * stride_x + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        y = tl.load(
            Y + cols[:, None] * stride_y + ks[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(x, tl.trans(y), acc, input_precision=INPUT_PRECISION)
    return acc * scale_log2


# tl.log2 compiles to libdevice's correctly rounded log2f: a ~15-instruction polynomial.
# The forward's column merge takes two per column per tile, and the (BLOCK_N,) column
# vectors are replicated in every thread of the tile's layout, so on sm_90a those
# polynomials were ~800 of the ~4,300 instructions each thread ran per 128 x 128 tile.
# PTX's lg2.approx.f32 is one MUFU instruction, absolute error under 2^-22 (PTX ISA):
# far below the fp32 rounding of a log-sum-exp of logits up to ~150 (log2 units).
# The interpreter (CPU tests) cannot run PTX and keeps tl.log2.
_PTX_LOG2 = tl.constexpr(not INTERPRETED)


@triton.jit
def _log2_fast(x):
    if _PTX_LOG2:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _load_rows(P, idx, n_rows, ks, D, stride):
    """P[idx, ks] as an (len(idx), len(ks)) tile in P's dtype; out-of-range entries are 0."""
    return tl.load(
        P + idx[:, None] * stride + ks[None, :],
        mask=(idx < n_rows)[:, None] & (ks < D)[None, :],
        other=0.0,
    )


@triton.jit
def _positive_column(rows, row_offset, HALF, MODE: tl.constexpr):
    if MODE == 0:  # CLIP: image i <-> caption i
        pos = rows + row_offset
    else:  # NT-Xent: view i of z1 <-> view i of z2
        pos = tl.where(rows < HALF, rows + HALF, rows - HALF) + row_offset
    return pos


# A column sum computed from the row pass's exponentials is trusted down to 2^-64 (in
# units of the tile's largest exp2): see _column_log2sumexp2_shared.
_MIN_SHARED_COLUMN_SUM = tl.constexpr(2.0**-64)


@triton.jit
def _column_log2sumexp2(s):
    """log2 sum_i exp2(s_ij) of each column of one (BLOCK_M, BLOCK_N) tile of logits (log2
    units; masked entries -inf), shifted by each column's own max."""
    c_max = tl.max(s, axis=0)
    c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
    return c_safe + _log2_fast(tl.sum(tl.exp2(s - c_safe[None, :]), axis=0))


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
        tile_lse = t + _log2_fast(col_sum)
    else:
        tile_lse = _column_log2sumexp2(s)
    return tile_lse


# Sizes and offsets change from call to call: compiling a variant per divisibility class
# of each would multiply compile time for nothing. Strides (hence D) stay specialised:
# they decide whether loads are vectorised.
_DYNAMIC_INTS = ["M", "N", "row_offset", "N_BUCKET", "DEVICE_KEY"]

# Two ways to feed the tensor cores, chosen per config by BLOCK_K (see _FWD_CONFIGS):
#   K-chunked    (BLOCK_K < D_PAD): each S tile is a loop over D in BLOCK_K slices of X
#                 and Y, as in a plain GEMM; any D fits, but X's block is re-read from L2
#                 for every column tile: BLOCK_M * BLOCK_N / (BLOCK_M + BLOCK_N) FLOP/byte.
#   whole rows   (BLOCK_K >= D_PAD): the program's X block (BLOCK_M, D_PAD) is loaded once
#                 and stays on chip; each column tile is one (BLOCK_N, D_PAD) load of Y,
#                 pipelined across column tiles: BLOCK_M FLOP/byte in the forward, and in
#                 the backward the same Y tile also feeds W @ Y: 2 BLOCK_M FLOP/byte.
# D_PAD is D rounded up to a power of two (>= 16, tl.dot's smallest K).


@triton.jit(do_not_specialize=_DYNAMIC_INTS)
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
    DEVICE_KEY,  # autotune key only: the GPU model (_device_key), so no other model reuses it
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
            x = _load_rows(X, rows, M, ks, D, stride_x)  # (BLOCK_M, D_PAD)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # The positive logit is read off the same tiles (same rounding as the lse, and no
        # O(M D) temporaries for a separate dot product); only tiles holding one look.
        pos = _positive_column(rows, row_offset, half, MODE)
        pos_lo = tl.min(tl.where(row_ok, pos, N))
        pos_hi = tl.max(tl.where(row_ok, pos, -1))
        p_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for col_start in range(0, N, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            if BLOCK_K >= D_PAD:
                y = _load_rows(Y, cols, N, ks, D, stride_y)  # (BLOCK_N, D_PAD)
                s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION) * scale_log2
            else:
                s = _logits_tile_log2(
                    X, Y, rows, cols, M, N, D, stride_x, stride_y, scale_log2,
                    BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
                )  # fmt: skip
            valid = row_ok[:, None] & col_ok[None, :]
            if MODE == 1:  # a view is never its own negative
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
                merged = hi_safe + _log2_fast(tl.exp2(old - hi_safe) + tl.exp2(tile_lse - hi_safe))
                tl.store(part, merged, mask=col_ok)
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
        tl.store(LSE_ROW + rows, lse, mask=row_ok)
        tl.store(POSITIVE + rows, p_i * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=_DYNAMIC_INTS)
def _row_gradient_kernel(
    X,  # (M, D) rows
    Y,  # (N, D) columns
    SCALE,  # (1,) fp32 s
    OUT_MULT,  # (1,) fp32 g * s / (2 N): upstream gradient times the chain-rule constants
    LSE_ROW,  # (M,) fp32 natural-log row log-sum-exp (this pass's rows)
    LSE_COL,  # (N,) fp32 natural-log column log-sum-exp (over *all* rows of the loss)
    DX,  # (M, D) out, dtype of X
    GS,  # (M,) fp32 out: gs_i = sum_j W_ij S_ij
    M,
    N,
    D,
    stride_x,
    stride_y,
    stride_dx,
    row_offset,
    N_BUCKET,
    DEVICE_KEY,
    MODE: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DX_COLS: tl.constexpr,  # min(D_PAD, _MAX_BLOCK_DX): dX columns one program can hold
    DX_SPLIT: tl.constexpr,  # config: programs sharing those columns (1, or 2 to halve them)
    INPUT_PRECISION: tl.constexpr,
):
    # Program (i, d) owns dX[row block i, d-block d] and keeps it in registers while it
    # walks every column block: recompute the S tile, form W, accumulate W @ Y. No
    # cross-program reduction, so no atomics; dL/dY comes from a second launch with
    # X and Y (and the two log-sum-exp vectors) swapped. With whole rows (one d-block,
    # BLOCK_DX == D_PAD) the Y tile that made S is the one W multiplies: one load, two dots.
    #
    # DX_SPLIT = 2 halves each program's dX columns, so two programs recompute each S tile.
    # Why pay that: with 8 warps and BLOCK_M = 64, Triton gives S's product the layout
    # W @ Y needs as its register operand, which has both warpgroups compute the whole S
    # tile (and its exps) anyway (ttgir: warpsPerCTA = [8, 1] for a 64-row S). Halved, a
    # program fits one warpgroup (4 warps, a 64 x 256 fp32 accumulator) in half the
    # registers and shared memory, so two programs share an SM and one's softmax can run
    # while the other's products do.
    BLOCK_DX: tl.constexpr = DX_COLS // DX_SPLIT
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale_log2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    rows, lse_row, pos = _gradient_rows(LSE_ROW, M, row_offset, pid_m, BLOCK_M, MODE)
    dcols = pid_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    if BLOCK_K >= D_PAD:
        tl.static_assert(BLOCK_DX == D_PAD, "whole rows: one program owns all of dX's row")
        x = _load_rows(X, rows, M, dcols, D, stride_x)  # (BLOCK_M, D_PAD), on chip throughout

    acc = tl.zeros((BLOCK_M, BLOCK_DX), dtype=tl.float32)
    gs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        y = _load_rows(Y, cols, N, dcols, D, stride_y)  # (BLOCK_N, BLOCK_DX)
        if BLOCK_K >= D_PAD:
            s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION) * scale_log2
        else:
            s = _logits_tile_log2(
                X, Y, rows, cols, M, N, D, stride_x, stride_y, scale_log2,
                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
            )  # fmt: skip
        w = _gradient_weights(s, LSE_COL, lse_row, rows, cols, pos, M, N, row_offset, MODE)
        gs += tl.sum(w * s, axis=1)
        # W in [-2, 2] is cast to the input dtype for the tensor cores (as attention
        # casts P before P @ V); the 1 / (2N) factor is applied after, in fp32.
        acc = tl.dot(w.to(y.dtype), y, acc, input_precision=INPUT_PRECISION)
    _store_row_gradient(acc, gs, OUT_MULT, DX, GS, rows, dcols, M, D, stride_dx, pid_d)


@triton.jit
def _gradient_rows(LSE_ROW, M, row_offset, pid_m, BLOCK_M: tl.constexpr, MODE: tl.constexpr):
    """Row block pid_m of a backward program: its row indices, their log-sum-exps in log2
    units, and their positive columns."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lse_row = tl.load(LSE_ROW + rows, mask=rows < M, other=0.0) * 1.4426950408889634
    return rows, lse_row, _positive_column(rows, row_offset, M // 2, MODE)


@triton.jit
def _gradient_weights(s, LSE_COL, lse_row, rows, cols, pos, M, N, row_offset, MODE: tl.constexpr):
    """W = P_row + P_col - 2 [positive] of one (BLOCK_M, BLOCK_N) tile of S * log2(e), with
    lse_row already in log2 units; 0 outside the matrix and (NT-Xent) on self-pairs."""
    col_ok = cols < N
    lse_col = tl.load(LSE_COL + cols, mask=col_ok, other=0.0) * 1.4426950408889634
    # P_row + P_col, both <= 1, so no overflow for any scale. Tried and dropped: one exp2
    # a logit, P_col = P_row * exp2(r_i - T) * exp2(T - c_j) (T the block's top lse, with
    # a per-tile fallback). Compiled for sm_90a (64-row tiles, 8 warps) it cut MUFU ops
    # by a fifth but added 2-10% instructions: the per-tile column factors and their
    # range check cost what the saved exp2s did, a thread holding only 8-16 logits of a
    # tile. (In the torch backend on a CPU it saved 2-3% of the backward.)
    w = tl.exp2(s - lse_row[:, None]) + tl.exp2(s - lse_col[None, :])
    w = tl.where(cols[None, :] == pos[:, None], w - 2.0, w)
    valid = (rows < M)[:, None] & col_ok[None, :]
    if MODE == 1:
        valid = valid & (cols[None, :] != (rows + row_offset)[:, None])
    return tl.where(valid, w, 0.0)


@triton.jit
def _store_row_gradient(acc, gs, OUT_MULT, DX, GS, rows, dcols, M, D, stride_dx, pid_d):
    """dX[rows, dcols] = out_mult * acc in DX's dtype; gs (natural-log units) once a row."""
    row_ok = rows < M
    out = acc * tl.load(OUT_MULT).to(tl.float32)
    tl.store(
        DX + rows[:, None] * stride_dx + dcols[None, :],
        out.to(DX.dtype.element_ty),
        mask=row_ok[:, None] & (dcols < D)[None, :],
    )
    if pid_d == 0:
        tl.store(GS + rows, gs * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=_DYNAMIC_INTS)
def _row_gradient_tma_kernel(
    x_desc,  # TMA descriptor of X (M, D), block (BLOCK_M, D_PAD)
    y_desc,  # TMA descriptor of Y (N, D), block (BLOCK_N, D_PAD): S's operand
    y_dx_desc,  # TMA descriptor of Y (N, D), block (BLOCK_N, BLOCK_DX): W @ Y's operand
    SCALE,  # (1,) fp32 s
    OUT_MULT,  # (1,) fp32 g * s / (2 N)
    LSE_ROW,  # (M,) fp32 natural-log row log-sum-exp
    LSE_COL,  # (N,) fp32 natural-log column log-sum-exp
    DX,  # (M, D) out, dtype of X
    GS,  # (M,) fp32 out
    M,
    N,
    D,
    stride_dx,
    row_offset,
    N_BUCKET,
    DEVICE_KEY,
    MODE: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DX_COLS: tl.constexpr,
    DX_SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    # _row_gradient_kernel's whole-rows scheme, with every tile of X and Y loaded by the
    # TMA unit (rows past M or N and columns past D arrive as zeros: no load masks) and
    # the column loop offered to Triton's automatic warp specialisation. On Hopper that
    # gives the loads a producer warp and the products and the softmax partitions of
    # their own, so one tile's exponentials can run while the next tile's products do:
    # the overlap the plain kernel does not get. Experimental: used only when
    # MEGABATCH_TRITON_WS=1 (see row_gradient), until a GPU run shows it pays.
    BLOCK_DX: tl.constexpr = DX_COLS // DX_SPLIT
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale_log2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    rows, lse_row, pos = _gradient_rows(LSE_ROW, M, row_offset, pid_m, BLOCK_M, MODE)
    x = x_desc.load([pid_m * BLOCK_M, 0])  # (BLOCK_M, D_PAD), on chip throughout
    acc = tl.zeros((BLOCK_M, BLOCK_DX), dtype=tl.float32)
    gs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in tl.range(0, N, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = col_start + tl.arange(0, BLOCK_N)
        y = y_desc.load([col_start, 0])  # (BLOCK_N, D_PAD)
        s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION) * scale_log2
        w = _gradient_weights(s, LSE_COL, lse_row, rows, cols, pos, M, N, row_offset, MODE)
        gs += tl.sum(w * s, axis=1)
        y_dx = y_dx_desc.load([col_start, pid_d * BLOCK_DX])  # (BLOCK_N, BLOCK_DX)
        acc = tl.dot(w.to(y_dx.dtype), y_dx, acc, input_precision=INPUT_PRECISION)
    dcols = pid_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    _store_row_gradient(acc, gs, OUT_MULT, DX, GS, rows, dcols, M, D, stride_dx, pid_d)


# --------------------------------------------------------------------------- tuning
# Candidates for D = 256..1024 on Hopper (H200: 132 SMs, 227 KB of shared memory per
# block, 64K 32-bit registers per SM). What bounds them, for bf16 and D_PAD = 512:
#   forward, K-chunked: (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes per pipeline stage;
#   forward, whole rows: X's block, BLOCK_M * 1 KB, plus BLOCK_N * 1 KB per stage;
#   backward: the (BLOCK_M, BLOCK_DX) fp32 accumulator lives in registers, so BLOCK_M
#   stays at 64 (128 KB of registers over 8 warps); whole rows add X's block (64 KB)
#   and a (BLOCK_N, 512) Y tile per stage. DX_SPLIT = 2 (4 warps, 64 x 256 accumulator)
#   compiles to 255 registers x 128 threads and 80-96 KB: two programs fit an SM.
# Configs that do not fit are dropped before timing (_prune); the autotuner times the
# rest on the first call of each shape class and keeps the fastest. Measured on an H200
# at N = 65,536, D = 512: docs/benchmarks-passes.md.
WHOLE_ROWS = 1 << 30  # BLOCK_K meaning "all of D at once"


def _config(block_m, block_n, block_k, warps, stages, **kernel_specific):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **kernel_specific},
        num_warps=warps,
        num_stages=stages,
    )


def _fwd_config(block_m, block_n, block_k, warps, stages, one_exp=False):
    return _config(block_m, block_n, block_k, warps, stages, ONE_EXP=one_exp)


# ONE_EXP (the columns reuse the rows' exp2s, with a per-tile branch back to their own
# where that would be inexact) is offered on the two configs that were fastest without
# it (docs/benchmarks-passes.md). Compiled for sm_90a (tests/kernels/hopper_compile.py),
# with the fallback compiled out, they have 16% fewer instructions and 23% fewer MUFU ops
# than their twins (static counts: 2,648 against 3,144 and 198 against 258 at 3 stages),
# but use more registers (255 against 231) and hold a branch: whether that is faster,
# the autotuner finds out on the GPU.
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
_BWD_CONFIGS = [
    # K-chunked
    _config(64, 64, 64, 8, 2, DX_SPLIT=1),
    _config(64, 64, 128, 8, 3, DX_SPLIT=1),
    _config(64, 128, 64, 8, 2, DX_SPLIT=1),
    # K-chunked, dX columns halved: one warpgroup a program, two programs an SM
    _config(64, 64, 64, 4, 3, DX_SPLIT=2),
    _config(64, 64, 128, 4, 2, DX_SPLIT=2),
    # whole rows
    _config(64, 64, WHOLE_ROWS, 8, 2, DX_SPLIT=1),
    _config(64, 32, WHOLE_ROWS, 8, 3, DX_SPLIT=1),
    _config(64, 32, WHOLE_ROWS, 8, 2, DX_SPLIT=1),
]
_WHOLE_ROWS_MAX_BYTES = 1024  # the whole-rows configs above are sized for 512 bf16 columns
_MIN_FWD_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _FWD_CONFIGS)
# Interpreter (CPU) blocks: each interpreted op costs about the same whatever its size,
# so large blocks run the tests several times faster (128 vs 64: 4x). Tests switch
# BLOCK_K to WHOLE_ROWS to run the other loading scheme.
_INTERPRET_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}
_INTERPRET_DX_SPLIT = 1
_INTERPRET_ONE_EXP = True  # forward; tests switch it off to run the other column path
_MAX_BLOCK_DX = 512  # fp32 accumulator columns per program in the backward
_MIN_SPLIT_DX_COLS = 256  # halving dX's columns pays (if at all) only for wide rows


def _prune(configs, named_args, **kwargs):
    """The configs worth compiling and timing for this call's dtype and D.

    Whole-rows configs only where a padded row fits what they were sized for. IEEE fp32
    (fp32 inputs with TF32 off) runs on the CUDA cores, not the tensor cores, at a few
    percent of the bf16 rate: the block shapes above were chosen for the tensor cores,
    and timing them all there took minutes (on an H200, two gpu tests at N = 16,384
    passed their 120 s limit), so that path gets the smallest K-chunked config alone.
    Configs that split dX's columns only where a program would hold 256 of them or more;
    ONE_EXP configs only where there are column statistics (without, they are the same
    kernel as their twins: compiling and timing them would be wasted).
    """
    element_size = named_args["X"].element_size()
    if element_size == 4 and kwargs["INPUT_PRECISION"] == "ieee":
        unsplit = [c for c in configs if c.kwargs.get("DX_SPLIT", 1) == 1]
        chunked = [c for c in unsplit if c.kwargs["BLOCK_K"] != WHOLE_ROWS]
        return [min(chunked, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    fits = kwargs["D_PAD"] * element_size <= _WHOLE_ROWS_MAX_BYTES
    wide = kwargs.get("DX_COLS", 0) >= _MIN_SPLIT_DX_COLS
    columns = kwargs.get("WITH_COL", False)
    return [
        c
        for c in configs
        if (fits or c.kwargs["BLOCK_K"] != WHOLE_ROWS)
        and (wide or c.kwargs.get("DX_SPLIT", 1) == 1)
        and (columns or not c.kwargs.get("ONE_EXP", False))
    ]


# One launch at N = 65,536 takes milliseconds: 20 ms of timing per config is plenty.
_quick_bench = functools.partial(do_bench, warmup=5, rep=20)

_row_logsumexp_tuned = triton.autotune(
    _FWD_CONFIGS,
    key=["D", "N_BUCKET", "DEVICE_KEY", "MODE", "WITH_COL", "INPUT_PRECISION"],  # + dtypes
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["COL_PART"],
    do_bench=_quick_bench,
)(_row_logsumexp_kernel)
_row_gradient_tuned = triton.autotune(
    _BWD_CONFIGS,
    key=["D", "N_BUCKET", "DEVICE_KEY", "MODE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
    do_bench=_quick_bench,
)(_row_gradient_kernel)


def _tma_block_shapes(nargs):
    """Autotune pre-hook: the TMA descriptors' blocks follow the config being run."""
    block_dx = nargs["DX_COLS"] // nargs["DX_SPLIT"]
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["D_PAD"]]
    nargs["y_desc"].block_shape = [nargs["BLOCK_N"], nargs["D_PAD"]]
    nargs["y_dx_desc"].block_shape = [nargs["BLOCK_N"], block_dx]


def _tma_config(block_m, block_n, dx_split, warps, stages, warp_specialize):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "DX_SPLIT": dx_split,
         "WARP_SPECIALIZE": warp_specialize},
        num_warps=warps, num_stages=stages, pre_hook=_tma_block_shapes,
    )  # fmt: skip


# The experimental TMA backward's candidates. With warp specialisation Triton 3.6 on
# Hopper partitions the loop only for num_warps=4 (one consumer warpgroup; it adds the
# producer's warps, 12 in all). Compiled here for sm_90a at D = 512 bf16: 64 x 32 tiles
# with dX halved take 180 KB of shared memory and spill nothing, 64 x 64 in one stage
# 180 KB with 564 bytes of spills; 64 x 64 in two stages would need 295 KB, and 128-row
# blocks fail in the partitioning pass. The two unspecialised configs (164 KB, 197 KB)
# tell TMA's share of any gain from the specialisation's.
_TMA_BWD_CONFIGS = [
    _tma_config(64, 32, 2, 4, 2, True),
    _tma_config(64, 64, 2, 4, 1, True),
    _tma_config(64, 32, 2, 4, 2, False),
    _tma_config(64, 32, 1, 8, 2, False),
]
_TMA_MIN_D_PAD = 64  # halved, 32 dX columns: tl.dot's N must be >= 16
_row_gradient_tma_tuned = triton.autotune(
    _TMA_BWD_CONFIGS,
    key=["D", "N_BUCKET", "DEVICE_KEY", "MODE", "INPUT_PRECISION"],
    do_bench=_quick_bench,
)(_row_gradient_tma_kernel)


def _n_bucket(n: int) -> int:
    # Shapes of the same order tune alike; capping at 2^16 means a 1M-row batch reuses
    # the 65,536 choice instead of timing several configs for seconds each.
    return min(max(n - 1, 1).bit_length(), 16)


def _d_pad(d: int) -> int:
    return max(triton.next_power_of_2(d), 16)  # 16: tl.dot's smallest K


def _input_precision(dtype: torch.dtype) -> str:
    if INTERPRETED or dtype != torch.float32:
        return "ieee"
    # fp32 follows torch's own matmul setting, so "highest" means IEEE fp32 here too.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _num_sms(device_index: int) -> int:
    return _device_properties(device_index).multi_processor_count


def _device_key(x: torch.Tensor) -> int:
    """The GPU model in one int, for the autotune keys: a config chosen on one model
    (its shared memory, its SM count) is not reused on another in the same process."""
    if x.device.type != "cuda":
        return 0
    props = _device_properties(x.device.index or 0)
    return (props.major * 10 + props.minor) * 1000 + props.multi_processor_count


@functools.cache
def _device_properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def _check_runnable(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
            "kernels is imported; use backend='torch' for CPU training"
        )


# --------------------------------------------------------------------------- launchers
def row_logsumexp(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    *,
    row_offset: int,
    mode: int,
    with_col: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """lse_row (M,), positive logits (M,) and, if with_col, these rows' column lse (N,)."""
    _check_runnable(x)
    x, y = x.contiguous(), y.contiguous()
    m, d = x.shape
    n = y.shape[0]
    lse_row = torch.empty(m, device=x.device, dtype=torch.float32)
    positive = torch.empty(m, device=x.device, dtype=torch.float32)
    if INTERPRETED:
        blocks = {**_INTERPRET_BLOCKS, "ONE_EXP": _INTERPRET_ONE_EXP}
        programs = triton.cdiv(m, blocks["BLOCK_M"])
        if with_col:
            programs = min(programs, 4)
    else:
        blocks = {}
        programs = triton.cdiv(m, _MIN_FWD_BLOCK_M)
        if with_col:
            programs = min(programs, _num_sms(x.device.index or 0))
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
        _n_bucket(n),
        _device_key(x),
        MODE=mode,
        WITH_COL=with_col,
        D_PAD=_d_pad(d),
        INPUT_PRECISION=_input_precision(x.dtype),
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


def row_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    out_mult: torch.Tensor,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    *,
    row_offset: int,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dX (M, D) in x's dtype and gs (M,) fp32; see the module docstring."""
    _check_runnable(x)
    x, y = x.contiguous(), y.contiguous()
    m, d = x.shape
    n = y.shape[0]
    dx = torch.empty_like(x)
    gs = torch.empty(m, device=x.device, dtype=torch.float32)
    dx_cols = min(_d_pad(d), _MAX_BLOCK_DX)
    if _use_tma_backward(x, y):
        _row_gradient_tma(x, y, scale, out_mult, lse_row, lse_col, dx, gs, dx_cols,
                          row_offset=row_offset, mode=mode)  # fmt: skip
        return dx, gs
    blocks = {**_INTERPRET_BLOCKS, "DX_SPLIT": _INTERPRET_DX_SPLIT} if INTERPRETED else {}

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, dx_cols // meta["DX_SPLIT"]))

    kernel = _row_gradient_kernel if INTERPRETED else _row_gradient_tuned
    kernel[grid](
        x,
        y,
        scale,
        out_mult,
        lse_row.contiguous(),
        lse_col.contiguous(),
        dx,
        gs,
        m,
        n,
        d,
        x.stride(0),
        y.stride(0),
        dx.stride(0),
        row_offset,
        _n_bucket(n),
        _device_key(x),
        MODE=mode,
        D_PAD=_d_pad(d),
        DX_COLS=dx_cols,
        INPUT_PRECISION=_input_precision(x.dtype),
        **blocks,
    )
    return dx, gs


def _use_tma_backward(x: torch.Tensor, y: torch.Tensor) -> bool:
    """MEGABATCH_TRITON_WS=1, inputs for the tensor cores (bf16, fp16, fp32 with TF32; any
    under the interpreter, which checks the maths only), and TMA can read them: 16-byte
    aligned rows, whole rows that fit the configs (D_PAD * element size <= 1 KB), and at
    least _TMA_MIN_D_PAD columns."""
    if os.environ.get(TMA_BACKWARD_ENV, "0") != "1":
        return False
    d_pad, size = _d_pad(x.shape[1]), x.element_size()
    tensor_cores = size == 2 or _input_precision(x.dtype) == "tf32"
    return (
        (tensor_cores or INTERPRETED)
        and (x.shape[1] * size) % 16 == 0
        and x.data_ptr() % 16 == 0
        and y.data_ptr() % 16 == 0
        and _TMA_MIN_D_PAD <= d_pad
        and d_pad * size <= _WHOLE_ROWS_MAX_BYTES
    )


def _row_gradient_tma(x, y, scale, out_mult, lse_row, lse_col, dx, gs, dx_cols, *,
                      row_offset, mode):  # fmt: skip
    """row_gradient through _row_gradient_tma_kernel, writing dx and gs."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, d = x.shape
    n = y.shape[0]
    d_pad = _d_pad(d)
    # Block shapes are the pre-hook's to set per config; these fit the interpreter's.
    blocks = {"BLOCK_M": _INTERPRET_BLOCKS["BLOCK_M"], "BLOCK_N": _INTERPRET_BLOCKS["BLOCK_N"],
              "DX_SPLIT": _INTERPRET_DX_SPLIT, "WARP_SPECIALIZE": True}  # fmt: skip
    x_desc = TensorDescriptor(x, [m, d], [x.stride(0), 1], [blocks["BLOCK_M"], d_pad])
    y_desc = TensorDescriptor(y, [n, d], [y.stride(0), 1], [blocks["BLOCK_N"], d_pad])
    y_dx_desc = TensorDescriptor(
        y, [n, d], [y.stride(0), 1], [blocks["BLOCK_N"], dx_cols // blocks["DX_SPLIT"]]
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, dx_cols // meta["DX_SPLIT"]))

    kernel = _row_gradient_tma_kernel if INTERPRETED else _row_gradient_tma_tuned
    kernel[grid](
        x_desc, y_desc, y_dx_desc, scale, out_mult, lse_row.contiguous(), lse_col.contiguous(),
        dx, gs, m, n, d, dx.stride(0), row_offset, _n_bucket(n), _device_key(x),
        MODE=mode, D_PAD=d_pad, DX_COLS=dx_cols, INPUT_PRECISION=_input_precision(x.dtype),
        **(blocks if INTERPRETED else {}),
    )  # fmt: skip
