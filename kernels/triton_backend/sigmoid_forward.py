"""SigLIP's forward: each row's sum of -log sigmoid(z_ij l_ij), and the jit helpers the
backward shares.

_pairwise_sigmoid_loss_kernel, its autotune configs, and its launcher
pairwise_sigmoid_loss (kernels.siglip.SigmoidBackend; the maths in kernels.siglip).
Natural-log units throughout: the terms are softplus and sigmoid of l itself, with no
running maximum to carry in base 2 as the softmax passes do.
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
)


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def flipped_logits(s, t, b, rows, cols, row_offset):
    """m = -z (t s + b) of a tile and where z = +1 (row i's partner, column row_offset + i):
    z = -1 elsewhere, so m = l there and -l on the partners."""
    logits = s * t + b
    partner = cols[None, :] == (rows + row_offset)[:, None]
    return tl.where(partner, -logits, logits), partner


@triton.jit
def softplus(m):
    """log(1 + exp(m)) = max(m, 0) + log1p(exp(-|m|)), for any m without overflow.

    log1p(e) as log(u) * e / (u - 1), u = 1 + e (Goldberg's correction: u - 1 is exact,
    so the ratio undoes u's rounding), e itself where u rounds to 1. A plain log(1 + e)
    would lose e's low bits: with SigLIP's b = -10 most terms are e ~ 5e-5, which would
    carry relative errors of ~1e-3, and N^2 of them make the loss."""
    e = tl.exp(-tl.abs(m))  # [0, 1]
    u = 1.0 + e
    rounded_to_one = u == 1.0
    ratio = e / tl.where(rounded_to_one, 1.0, u - 1.0)  # no 0 / 0, even in the unused lanes
    return tl.maximum(m, 0.0) + tl.where(rounded_to_one, e, tl.log(u) * ratio)


@triton.jit
def sigmoid(m):
    """1 / (1 + exp(-m)) from e = exp(-|m|) <= 1, which never overflows (tl.sigmoid's
    exp(-m) does, harmlessly, for m < -88: this keeps the interpreter's numpy quiet)."""
    e = tl.exp(-tl.abs(m))
    return tl.where(m >= 0, 1.0, e) / (1.0 + e)


# --------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=DYNAMIC_INTS)
def _pairwise_sigmoid_loss_kernel(
    X,  # (M, D) rows
    Y,  # (N, D) columns
    SCALE,  # (1,) fp32 t
    BIAS,  # (1,) fp32 b
    ROW_LOSS,  # (M,) fp32 out: sum_j softplus(m_ij)
    M,
    N,
    D,
    stride_x,
    stride_y,
    row_offset,
    N_BUCKET,  # autotune key only: log2 of N, capped, so a shape class is tuned once
    DEVICE_KEY,  # autotune key only: the GPU model (common.device_key)
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Program i owns row block i and walks every column block, summing its rows' terms in
    # registers: no statistic crosses programs, so no partials, atomics or merges.
    t = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, D_PAD)
    if BLOCK_K >= D_PAD:  # whole rows: X's block stays on chip for the whole sweep
        x = load_rows(X, rows, M, ks, D, stride_x)  # (BLOCK_M, D_PAD)
    row_loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in range(0, N, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        if BLOCK_K >= D_PAD:
            y = load_rows(Y, cols, N, ks, D, stride_y)  # (BLOCK_N, D_PAD)
            s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION)
        else:  # logits_tile_log2 returns the dot times its multiplier: 1, the raw s
            s = logits_tile_log2(
                X, Y, rows, cols, M, N, D, stride_x, stride_y, 1.0,
                BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION,
            )  # fmt: skip
        m, _ = flipped_logits(s, t, b, rows, cols, row_offset)
        valid = row_ok[:, None] & (cols < N)[None, :]
        row_loss += tl.sum(tl.where(valid, softplus(m), 0.0), axis=1)
    tl.store(ROW_LOSS + rows, row_loss, mask=row_ok)


# --------------------------------------------------------------------------- tuning
# A few of the CLIP forward's shapes (forward._FWD_CONFIGS), without its column table:
# this pass holds one (BLOCK_M,) sum a program, so what bounds them is the tiles'
# shared memory, as there.
_FWD_CONFIGS = [
    # K-chunked
    make_config(128, 128, 64, 8, 3),
    make_config(128, 64, 64, 4, 4),
    make_config(64, 64, 64, 4, 3),
    # whole rows
    make_config(64, 64, WHOLE_ROWS, 4, 2),
    make_config(128, 64, WHOLE_ROWS, 8, 1),
]

_pairwise_sigmoid_loss_tuned = triton.autotune(
    _FWD_CONFIGS,
    key=["D", "N_BUCKET", "DEVICE_KEY", "INPUT_PRECISION"],  # + dtypes
    prune_configs_by={"early_config_prune": prune_configs},
    do_bench=quick_bench,
)(_pairwise_sigmoid_loss_kernel)


# --------------------------------------------------------------------------- launcher
def pairwise_sigmoid_loss(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, row_offset: int
) -> torch.Tensor:
    """(M,) fp32 loss_i = sum_j softplus(-z_ij (t x_i . y_j + b)): SigmoidBackend's."""
    check_runnable(x)
    x, y = x.contiguous(), y.contiguous()
    m, d = x.shape
    n = y.shape[0]
    row_loss = torch.empty(m, device=x.device, dtype=torch.float32)
    blocks = dict(common.INTERPRET_BLOCKS) if INTERPRETED else {}

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    kernel = _pairwise_sigmoid_loss_kernel if INTERPRETED else _pairwise_sigmoid_loss_tuned
    kernel[grid](
        x,
        y,
        scale,
        bias,
        row_loss,
        m,
        n,
        d,
        x.stride(0),
        y.stride(0),
        row_offset,
        n_bucket(n),
        device_key(x),
        D_PAD=d_pad(d),
        INPUT_PRECISION=input_precision(x.dtype),
        **blocks,
    )
    return row_loss
