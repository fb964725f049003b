"""Experimental backward: the row pass through TMA loads and warp specialisation.

_row_gradient_tma_kernel computes what backward._row_gradient_kernel does (same W, dX
and gs) from TMA descriptors, with its column loop offered to Triton's automatic warp
specialisation. It runs only where MEGABATCH_TRITON_WS=1 (read at each call) and the
features suit TMA (use_tma_backward); backward.row_gradient then calls row_gradient_tma.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megabatch.kernels.backend import LossMode
from megabatch.kernels.triton_backend import common
from megabatch.kernels.triton_backend.common import (
    DYNAMIC_INTS,
    INTERPRETED,
    WHOLE_ROWS_MAX_BYTES,
    d_pad,
    device_key,
    gradient_rows,
    gradient_weights,
    input_precision,
    n_bucket,
    quick_bench,
    store_row_gradient,
)

# Set to 1 to run the backward through the experimental TMA + warp-specialised kernel
# (_row_gradient_tma_kernel) wherever TMA can read the features; read at each call.
TMA_BACKWARD_ENV = "MEGABATCH_TRITON_WS"


@triton.jit(do_not_specialize=DYNAMIC_INTS)
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
    # backward._row_gradient_kernel's whole-rows scheme, with every tile of X and Y loaded by the
    # TMA unit (rows past M or N and columns past D arrive as zeros: no load masks) and
    # the column loop offered to Triton's automatic warp specialisation. On Hopper that
    # gives the loads a producer warp and the products and the softmax partitions of
    # their own, so one tile's exponentials can run while the next tile's products do:
    # the overlap the plain kernel does not get. Experimental: used only when
    # MEGABATCH_TRITON_WS=1 (see backward.row_gradient), until a GPU run shows it pays.
    BLOCK_DX: tl.constexpr = DX_COLS // DX_SPLIT
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale_log2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    rows, lse_row, pos = gradient_rows(LSE_ROW, M, row_offset, pid_m, BLOCK_M, MODE)
    x = x_desc.load([pid_m * BLOCK_M, 0])  # (BLOCK_M, D_PAD), on chip throughout
    acc = tl.zeros((BLOCK_M, BLOCK_DX), dtype=tl.float32)
    gs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col_start in tl.range(0, N, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = col_start + tl.arange(0, BLOCK_N)
        y = y_desc.load([col_start, 0])  # (BLOCK_N, D_PAD)
        s = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION) * scale_log2
        w = gradient_weights(s, LSE_COL, lse_row, rows, cols, pos, M, N, row_offset, MODE)
        gs += tl.sum(w * s, axis=1)
        y_dx = y_dx_desc.load([col_start, pid_d * BLOCK_DX])  # (BLOCK_N, BLOCK_DX)
        acc = tl.dot(w.to(y_dx.dtype), y_dx, acc, input_precision=INPUT_PRECISION)
    dcols = pid_d * BLOCK_DX + tl.arange(0, BLOCK_DX)
    store_row_gradient(acc, gs, OUT_MULT, DX, GS, rows, dcols, M, D, stride_dx, pid_d)


# --------------------------------------------------------------------------- tuning
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


# The candidates. With warp specialisation Triton 3.6 on Hopper partitions the loop only
# for num_warps=4 (one consumer warpgroup; it adds the producer's warps, 12 in all). The
# specialised ones are the tile shapes that fit Hopper's shared memory at D = 512 bf16:
# 64 x 32 with dX halved, and 64 x 64 in one stage; 64 x 64 in two stages does not fit,
# and 128-row blocks fail in the partitioning pass (their shared memory and spills as
# compiled: docs/benchmarks.md, "Kernel design measurements"). The two unspecialised
# configs tell TMA's share of any gain from the specialisation's.
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
    do_bench=quick_bench,
)(_row_gradient_tma_kernel)


# --------------------------------------------------------------------------- launcher
def use_tma_backward(x: torch.Tensor, y: torch.Tensor) -> bool:
    """MEGABATCH_TRITON_WS=1, inputs for the tensor cores (bf16, fp16, fp32 with TF32; any
    under the interpreter, which checks the maths only), and TMA can read them: 16-byte
    aligned rows, whole rows that fit the configs (D_PAD * element size <= 1 KB), and at
    least _TMA_MIN_D_PAD columns."""
    if os.environ.get(TMA_BACKWARD_ENV, "0") != "1":
        return False
    padded, size = d_pad(x.shape[1]), x.element_size()
    tensor_cores = size == 2 or input_precision(x.dtype) == "tf32"
    return (
        (tensor_cores or INTERPRETED)
        and (x.shape[1] * size) % 16 == 0
        and x.data_ptr() % 16 == 0
        and y.data_ptr() % 16 == 0
        and _TMA_MIN_D_PAD <= padded
        and padded * size <= WHOLE_ROWS_MAX_BYTES
    )


def row_gradient_tma(x, y, scale, out_mult, lse_row, lse_col, dx, gs, dx_cols, *,
                     row_offset, mode: LossMode):  # fmt: skip
    """backward.row_gradient through _row_gradient_tma_kernel, writing dx and gs."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, d = x.shape
    n = y.shape[0]
    padded = d_pad(d)
    # Block shapes are the pre-hook's to set per config; these fit the interpreter's.
    interpret = common.INTERPRET_BLOCKS
    blocks = {"BLOCK_M": interpret["BLOCK_M"], "BLOCK_N": interpret["BLOCK_N"],
              "DX_SPLIT": common.INTERPRET_DX_SPLIT, "WARP_SPECIALIZE": True}  # fmt: skip
    x_desc = TensorDescriptor(x, [m, d], [x.stride(0), 1], [blocks["BLOCK_M"], padded])
    y_desc = TensorDescriptor(y, [n, d], [y.stride(0), 1], [blocks["BLOCK_N"], padded])
    y_dx_desc = TensorDescriptor(
        y, [n, d], [y.stride(0), 1], [blocks["BLOCK_N"], dx_cols // blocks["DX_SPLIT"]]
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, dx_cols // meta["DX_SPLIT"]))

    kernel = _row_gradient_tma_kernel if INTERPRETED else _row_gradient_tma_tuned
    kernel[grid](
        x_desc, y_desc, y_dx_desc, scale, out_mult, lse_row.contiguous(), lse_col.contiguous(),
        dx, gs, m, n, d, dx.stride(0), row_offset, n_bucket(n), device_key(x),
        MODE=int(mode), D_PAD=padded, DX_COLS=dx_cols, INPUT_PRECISION=input_precision(x.dtype),
        **(blocks if INTERPRETED else {}),
    )  # fmt: skip
