"""SigLIP's backward: dL/dX of a block of rows, and gt, gb for dL/dt and dL/db.

_pairwise_sigmoid_gradient_kernel, its autotune configs, and its launcher
pairwise_sigmoid_gradient (kernels.siglip.SigmoidBackend; the maths in kernels.siglip).
The program layout is the CLIP backward's (backward.py): program (i, d) keeps
dX[row block i, d-block d] in registers while it walks every column block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megabatch.kernels.triton_backend import common
from megabatch.kernels.triton_backend.common import (
    DYNAMIC_INTS,
    INTERPRETED,
    WHOLE_ROWS,
    check_runnable,
    d_pad,
    device_key,
    input_precision,
    load_rows,
    logits_tile_log2,
    make_config,
    n_bucket,
    prune_configs,
    quick_bench,
    store_dx,
)
from megabatch.kernels.triton_backend.sigmoid_forward import flipped_logits, sigmoid


@triton.jit(do_not_specialize=DYNAMIC_INTS)
def _pairwise_sigmoid_gradient_kernel(
    X,  # (M, D) rows
    Y,  # (N, D) columns
    SCALE,  # (1,) fp32 t
    BIAS,  # (1,) fp32 b
    OUT_MULT,  # (1,) fp32 g t / N: upstream gradient times the chain-rule constants
    DX,  # (M, D) out, dtype of X
    GT,  # (M,) fp32 out: gt_i = sum_j W_ij s_ij
    GB,  # (M,) fp32 out: gb_i = sum_j W_ij
    M,
    N,
    D,
    stride_x,
    stride_y,
    stride_dx,
    row_offset,
    N_BUCKET,
    DEVICE_KEY,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DX_COLS: tl.constexpr,  # min(D_PAD, _MAX_BLOCK_DX): dX columns one program can hold
    DX_SPLIT: tl.constexpr,  # config: programs sharing those columns (1, or 2 to halve them)
    INPUT_PRECISION: tl.constexpr,
):
    # Per tile: recompute s, W = -z sigmoid(-z (t s + b)), accumulate W @ Y. No
    # cross-program reduction, so no atomics; dL/dY is a second launch with X and Y
    # swapped (the transposed problem has the same partners). With whole rows the Y tile
    # that made s is the one W multiplies: one load, two dots.
    BLOCK_DX: tl.constexpr = DX_COLS // DX_SPLIT
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dcols = pid_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    if BLOCK_K >= D_PAD:
        tl.static_assert(BLOCK_DX == D_PAD, "whole rows: one program owns all of dX's row")
        x = load_rows(X, rows, M, dcols, D, stride_x)  # (BLOCK_M, D_PAD), on chip throughout

    acc = tl.zeros((BLOCK_M, BLOCK_DX), dtype=tl.float32)
    gt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        y = load_rows(Y, cols, N, dcols, D, stride_y)  # (BLOCK_N, BLOCK_DX)
        if BLOCK_K >= D_PAD:
            s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION)
        else:  # logits_tile_log2 returns the dot times its multiplier: 1, the raw s
            s = logits_tile_log2(
                X, Y, rows, cols, M, N, D, stride_x, stride_y, 1.0,
                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
            )  # fmt: skip
        m, partner = flipped_logits(s, t, b, rows, cols, row_offset)
        w = sigmoid(m)  # in [0, 1] for any t and b
        w = tl.where(partner, -w, w)  # W = -z sigmoid(m)
        w = tl.where(row_ok[:, None] & (cols < N)[None, :], w, 0.0)
        gt += tl.sum(w * s, axis=1)
        gb += tl.sum(w, axis=1)
        # W in [-1, 1] is cast to the input dtype for the tensor cores (as the CLIP
        # backward casts its W); the 1 / N factor is applied after, in fp32.
        acc = tl.dot(w.to(y.dtype), y, acc, input_precision=INPUT_PRECISION)

    store_dx(acc, OUT_MULT, DX, rows, dcols, M, D, stride_dx)
    if pid_d == 0:
        tl.store(GT + rows, gt, mask=row_ok)
        tl.store(GB + rows, gb, mask=row_ok)


# --------------------------------------------------------------------------- tuning
# The CLIP backward's candidates that hold one accumulator of each kind
# (backward._BWD_CONFIGS, bounded as there by the (BLOCK_M, BLOCK_DX) fp32 accumulator
# in registers); this kernel's per-tile work is one sigmoid a logit instead of two exp2s.
_BWD_CONFIGS = [
    # K-chunked
    make_config(64, 64, 64, 8, 2, DX_SPLIT=1),
    make_config(64, 128, 64, 8, 2, DX_SPLIT=1),
    # K-chunked, dX columns halved: one warpgroup a program, two programs an SM
    make_config(64, 64, 64, 4, 3, DX_SPLIT=2),
    # whole rows
    make_config(64, 64, WHOLE_ROWS, 8, 2, DX_SPLIT=1),
    make_config(64, 32, WHOLE_ROWS, 8, 3, DX_SPLIT=1),
]
_MAX_BLOCK_DX = 512  # fp32 accumulator columns per program, as backward.py

_pairwise_sigmoid_gradient_tuned = triton.autotune(
    _BWD_CONFIGS,
    key=["D", "N_BUCKET", "DEVICE_KEY", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": prune_configs},
    do_bench=quick_bench,
)(_pairwise_sigmoid_gradient_kernel)


# --------------------------------------------------------------------------- launcher
def pairwise_sigmoid_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    out_mult: torch.Tensor,
    *,
    row_offset: int,
    with_col_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dX (M, D) in x's dtype, gt (M,) and gb (M,) fp32: SigmoidBackend's.

    No dY (with_col_grad): summing it over row programs would need atomics; the caller
    runs a second launch with X and Y swapped instead."""
    if with_col_grad:
        raise ValueError("backend='triton' has no column gradient (supports_column_gradient)")
    check_runnable(x)
    x, y = x.contiguous(), y.contiguous()
    m, d = x.shape
    n = y.shape[0]
    dx = torch.empty_like(x)
    gt = torch.empty(m, device=x.device, dtype=torch.float32)
    gb = torch.empty(m, device=x.device, dtype=torch.float32)
    dx_cols = min(d_pad(d), _MAX_BLOCK_DX)
    blocks = {}
    if INTERPRETED:
        blocks = {**common.INTERPRET_BLOCKS, "DX_SPLIT": common.INTERPRET_DX_SPLIT}

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, dx_cols // meta["DX_SPLIT"]))

    kernel = _pairwise_sigmoid_gradient_kernel if INTERPRETED else _pairwise_sigmoid_gradient_tuned
    kernel[grid](
        x,
        y,
        scale,
        bias,
        out_mult,
        dx,
        gt,
        gb,
        m,
        n,
        d,
        x.stride(0),
        y.stride(0),
        dx.stride(0),
        row_offset,
        n_bucket(n),
        device_key(x),
        D_PAD=d_pad(d),
        DX_COLS=dx_cols,
        INPUT_PRECISION=input_precision(x.dtype),
        **blocks,
    )
    return dx, gt, gb
