"""The backward pass: dL/dX of a block of rows, and gs = sum_j W_ij S_ij for dL/ds.

_row_gradient_kernel, its autotune configs, and its launcher row_gradient
(ContrastiveBackend.row_gradient; the maths in megabatch.kernels.backend). Where
MEGABATCH_TRITON_WS=1 the launcher hands over to the experimental kernel of
backward_tma.py instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megabatch.kernels.backend import LossMode
from megabatch.kernels.triton_backend import backward_tma, common
from megabatch.kernels.triton_backend.common import (
    DYNAMIC_INTS,
    INTERPRETED,
    WHOLE_ROWS,
    check_runnable,
    d_pad,
    device_key,
    gradient_rows,
    gradient_weights,
    input_precision,
    load_rows,
    logits_tile_log2,
    make_config,
    n_bucket,
    prune_configs,
    quick_bench,
    store_row_gradient,
)


@triton.jit(do_not_specialize=DYNAMIC_INTS)
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
    rows, lse_row, pos = gradient_rows(LSE_ROW, M, row_offset, pid_m, BLOCK_M, MODE)
    dcols = pid_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    if BLOCK_K >= D_PAD:
        tl.static_assert(BLOCK_DX == D_PAD, "whole rows: one program owns all of dX's row")
        x = load_rows(X, rows, M, dcols, D, stride_x)  # (BLOCK_M, D_PAD), on chip throughout

    acc = tl.zeros((BLOCK_M, BLOCK_DX), dtype=tl.float32)
    gs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        y = load_rows(Y, cols, N, dcols, D, stride_y)  # (BLOCK_N, BLOCK_DX)
        if BLOCK_K >= D_PAD:
            s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION) * scale_log2
        else:
            s = logits_tile_log2(
                X, Y, rows, cols, M, N, D, stride_x, stride_y, scale_log2,
                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
            )  # fmt: skip
        w = gradient_weights(s, LSE_COL, lse_row, rows, cols, pos, M, N, row_offset, MODE)
        gs += tl.sum(w * s, axis=1)
        # W in [-2, 2] is cast to the input dtype for the tensor cores (as attention
        # casts P before P @ V); the 1 / (2N) factor is applied after, in fp32.
        acc = tl.dot(w.to(y.dtype), y, acc, input_precision=INPUT_PRECISION)
    store_row_gradient(acc, gs, OUT_MULT, DX, GS, rows, dcols, M, D, stride_dx, pid_d)


# --------------------------------------------------------------------------- tuning
# What bounds the candidates, for bf16 and D_PAD = 512: the (BLOCK_M, BLOCK_DX) fp32
# accumulator lives in registers, so BLOCK_M stays at 64 (128 KB of registers over 8
# warps); whole rows add X's block (64 KB) and a (BLOCK_N, 512) Y tile per stage.
# DX_SPLIT = 2 (4 warps, a 64 x 256 accumulator) is sized so that two programs fit an SM
# (its registers and shared memory as compiled: docs/benchmarks.md, "Kernel design
# measurements").
_BWD_CONFIGS = [
    # K-chunked
    make_config(64, 64, 64, 8, 2, DX_SPLIT=1),
    make_config(64, 64, 128, 8, 3, DX_SPLIT=1),
    make_config(64, 128, 64, 8, 2, DX_SPLIT=1),
    # K-chunked, dX columns halved: one warpgroup a program, two programs an SM
    make_config(64, 64, 64, 4, 3, DX_SPLIT=2),
    make_config(64, 64, 128, 4, 2, DX_SPLIT=2),
    # whole rows
    make_config(64, 64, WHOLE_ROWS, 8, 2, DX_SPLIT=1),
    make_config(64, 32, WHOLE_ROWS, 8, 3, DX_SPLIT=1),
    make_config(64, 32, WHOLE_ROWS, 8, 2, DX_SPLIT=1),
]
_MAX_BLOCK_DX = 512  # fp32 accumulator columns per program

_row_gradient_tuned = triton.autotune(
    _BWD_CONFIGS,
    key=["D", "N_BUCKET", "DEVICE_KEY", "MODE", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
    do_bench=quick_bench,
)(_row_gradient_kernel)


# --------------------------------------------------------------------------- launcher
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """dX (M, D) in x's dtype and gs (M,) fp32: ContrastiveBackend.row_gradient.

    No dY (with_col_grad): summing it over row programs would need atomics; CLIP runs a
    second pass with X and Y swapped instead."""
    if with_col_grad:
        raise ValueError("backend='triton' has no column gradient (supports_column_gradient)")
    check_runnable(x)
    x, y = x.contiguous(), y.contiguous()
    m, d = x.shape
    n = y.shape[0]
    dx = torch.empty_like(x)
    gs = torch.empty(m, device=x.device, dtype=torch.float32)
    dx_cols = min(d_pad(d), _MAX_BLOCK_DX)
    if backward_tma.use_tma_backward(x, y):
        backward_tma.row_gradient_tma(x, y, scale, out_mult, lse_row, lse_col, dx, gs, dx_cols,
                                      row_offset=row_offset, mode=mode)  # fmt: skip
        return dx, gs
    blocks = {}
    if INTERPRETED:
        blocks = {**common.INTERPRET_BLOCKS, "DX_SPLIT": common.INTERPRET_DX_SPLIT}

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
        n_bucket(n),
        device_key(x),
        MODE=int(mode),
        D_PAD=d_pad(d),
        DX_COLS=dx_cols,
        INPUT_PRECISION=input_precision(x.dtype),
        **blocks,
    )
    return dx, gs
