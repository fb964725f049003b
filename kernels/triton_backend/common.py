"""What the Triton passes share: jit helpers, autotune-config helpers, device helpers.

forward.py, backward.py and backward_tma.py each hold one pass's kernel, its autotune
configs and its launcher; the maths is in megabatch.kernels.backend.

Exponentials are taken base 2 (exp2 is one hardware instruction): logits are carried
as S * log2(e) and log-sum-exps converted back to natural log on the way out.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from megabatch.kernels.backend import LossMode

# On CPU tensors the kernels run under Triton's interpreter, which must be switched on
# with TRITON_INTERPRET=1 before this package is imported (tests/kernels/conftest.py).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# LossMode as the kernels compare it (`MODE == NTXENT`): launchers pass MODE=int(mode).
CLIP = tl.constexpr(int(LossMode.CLIP))
NTXENT = tl.constexpr(int(LossMode.NTXENT))

# Sizes and offsets change from call to call: compiling a variant per divisibility class
# of each would multiply compile time for nothing. Strides (hence D) stay specialised:
# they decide whether loads are vectorised.
DYNAMIC_INTS = ["M", "N", "row_offset", "N_BUCKET", "DEVICE_KEY"]

# Two ways to feed the tensor cores, chosen per config by BLOCK_K (forward._FWD_CONFIGS,
# backward._BWD_CONFIGS):
#   K-chunked    (BLOCK_K < D_PAD): each S tile is a loop over D in BLOCK_K slices of X
#                 and Y, as in a plain GEMM; any D fits, but X's block is re-read from L2
#                 for every column tile: BLOCK_M * BLOCK_N / (BLOCK_M + BLOCK_N) FLOP/byte.
#   whole rows   (BLOCK_K >= D_PAD): the program's X block (BLOCK_M, D_PAD) is loaded once
#                 and stays on chip; each column tile is one (BLOCK_N, D_PAD) load of Y,
#                 pipelined across column tiles: BLOCK_M FLOP/byte in the forward, and in
#                 the backward the same Y tile also feeds W @ Y: 2 BLOCK_M FLOP/byte.
# D_PAD is D rounded up to a power of two (>= 16, tl.dot's smallest K).


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def logits_tile_log2(
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


# tl.log2 compiles to libdevice's correctly rounded log2f, a polynomial of many
# instructions. The forward's column merge takes two per column per tile, and the
# (BLOCK_N,) column vectors are replicated in every thread of the tile's layout, so on
# sm_90a those polynomials were a large share of what each thread ran per tile (the
# counts: docs/benchmarks.md, "Kernel design measurements"). PTX's lg2.approx.f32 is one
# MUFU instruction, absolute error under 2^-22 (PTX ISA): far below the fp32 rounding of
# a log-sum-exp of logits up to ~150 (log2 units). The interpreter (CPU tests) cannot run
# PTX and keeps tl.log2.
_PTX_LOG2 = tl.constexpr(not INTERPRETED)


@triton.jit
def log2_fast(x):
    if _PTX_LOG2:
        return tl.inline_asm_elementwise(
            "lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def load_rows(P, idx, n_rows, ks, D, stride):
    """P[idx, ks] as an (len(idx), len(ks)) tile in P's dtype; out-of-range entries are 0."""
    return tl.load(
        P + idx[:, None] * stride + ks[None, :],
        mask=(idx < n_rows)[:, None] & (ks < D)[None, :],
        other=0.0,
    )


@triton.jit
def positive_column(rows, row_offset, HALF, MODE: tl.constexpr):
    if MODE == CLIP:  # image i <-> caption i
        pos = rows + row_offset
    else:  # NT-Xent: view i of z1 <-> view i of z2
        pos = tl.where(rows < HALF, rows + HALF, rows - HALF) + row_offset
    return pos


# The backward's helpers, shared by backward.py and backward_tma.py.
@triton.jit
def gradient_rows(LSE_ROW, M, row_offset, pid_m, BLOCK_M: tl.constexpr, MODE: tl.constexpr):
    """Row block pid_m of a backward program: its row indices, their log-sum-exps in log2
    units, and their positive columns."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lse_row = tl.load(LSE_ROW + rows, mask=rows < M, other=0.0) * 1.4426950408889634
    return rows, lse_row, positive_column(rows, row_offset, M // 2, MODE)


@triton.jit
def gradient_weights(s, LSE_COL, lse_row, rows, cols, pos, M, N, row_offset, MODE: tl.constexpr):
    """W = P_row + P_col - 2 [positive] of one (BLOCK_M, BLOCK_N) tile of S * log2(e), with
    lse_row already in log2 units; 0 outside the matrix and (NT-Xent) on self-pairs."""
    col_ok = cols < N
    lse_col = tl.load(LSE_COL + cols, mask=col_ok, other=0.0) * 1.4426950408889634
    # P_row + P_col, both <= 1, so no overflow for any scale. Tried and dropped: one exp2
    # a logit, P_col = P_row * exp2(r_i - T) * exp2(T - c_j) (T the block's top lse, with
    # a per-tile fallback). It saved MUFU ops but not instructions: the per-tile column
    # factors and their range check cost what the saved exp2s did, a thread holding only
    # 8-16 logits of a tile (the counts, and the torch backend's timing of the same idea:
    # docs/benchmarks.md, "Kernel design measurements").
    w = tl.exp2(s - lse_row[:, None]) + tl.exp2(s - lse_col[None, :])
    w = tl.where(cols[None, :] == pos[:, None], w - 2.0, w)
    valid = (rows < M)[:, None] & col_ok[None, :]
    if MODE == NTXENT:
        valid = valid & (cols[None, :] != (rows + row_offset)[:, None])
    return tl.where(valid, w, 0.0)


@triton.jit
def store_dx(acc, OUT_MULT, DX, rows, dcols, M, D, stride_dx):
    """dX[rows, dcols] = out_mult * acc, in DX's dtype (the CLIP and SigLIP backwards)."""
    out = acc * tl.load(OUT_MULT).to(tl.float32)
    tl.store(
        DX + rows[:, None] * stride_dx + dcols[None, :],
        out.to(DX.dtype.element_ty),
        mask=(rows < M)[:, None] & (dcols < D)[None, :],
    )


@triton.jit
def store_row_gradient(acc, gs, OUT_MULT, DX, GS, rows, dcols, M, D, stride_dx, pid_d):
    """dX[rows, dcols] = out_mult * acc in DX's dtype; gs (natural-log units) once a row."""
    store_dx(acc, OUT_MULT, DX, rows, dcols, M, D, stride_dx)
    if pid_d == 0:
        tl.store(GS + rows, gs * 0.6931471805599453, mask=rows < M)


# --------------------------------------------------------------------------- tuning
# Each pass's candidates are sized for D = 256..1024 on Hopper (H200: 132 SMs, 227 KB of
# shared memory per block, 64K 32-bit registers per SM); what bounds them is noted beside
# each list. Configs that do not fit are dropped before timing (prune_configs); the
# autotuner times the rest on the first call of each shape class and keeps the fastest.
# Its choices on an H200 at N = 65,536, D = 512: docs/benchmarks-passes.md.
WHOLE_ROWS = 1 << 30  # BLOCK_K meaning "all of D at once"
WHOLE_ROWS_MAX_BYTES = 1024  # the whole-rows configs are sized for 512 bf16 columns
_MIN_SPLIT_DX_COLS = 256  # halving dX's columns pays (if at all) only for wide rows
# Interpreter (CPU) blocks: each interpreted op costs about the same whatever its size,
# so large blocks run the tests faster (docs/benchmarks.md, "Kernel design
# measurements"). Tests switch BLOCK_K to WHOLE_ROWS to run the other loading scheme.
# The launchers read these two through the module (common.INTERPRET_BLOCKS), so that
# tests can patch them.
INTERPRET_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}
INTERPRET_DX_SPLIT = 1


def make_config(block_m, block_n, block_k, warps, stages, **kernel_specific):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **kernel_specific},
        num_warps=warps,
        num_stages=stages,
    )


def prune_configs(configs, named_args, **kwargs):
    """The configs worth compiling and timing for this call's dtype and D.

    Whole-rows configs only where a padded row fits what they were sized for. IEEE fp32
    (fp32 inputs with TF32 off) runs on the CUDA cores, not the tensor cores, at a few
    percent of the bf16 rate: the block shapes were chosen for the tensor cores, and
    timing them all there pushed gpu tests past their time limit (docs/benchmarks.md,
    "Kernel design measurements"), so that path gets the smallest K-chunked config
    alone. Configs that split dX's columns only where a program would hold 256 of them
    or more; ONE_EXP configs only where there are column statistics (without, they are
    the same kernel as their twins: compiling and timing them would be wasted).
    """
    element_size = named_args["X"].element_size()
    if element_size == 4 and kwargs["INPUT_PRECISION"] == "ieee":
        unsplit = [c for c in configs if c.kwargs.get("DX_SPLIT", 1) == 1]
        chunked = [c for c in unsplit if c.kwargs["BLOCK_K"] != WHOLE_ROWS]
        return [min(chunked, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    fits = kwargs["D_PAD"] * element_size <= WHOLE_ROWS_MAX_BYTES
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
quick_bench = functools.partial(do_bench, warmup=5, rep=20)


# --------------------------------------------------------------------------- device helpers
def n_bucket(n: int) -> int:
    # Shapes of the same order tune alike; capping at 2^16 means a 1M-row batch reuses
    # the 65,536 choice instead of timing several configs for seconds each.
    return min(max(n - 1, 1).bit_length(), 16)


def d_pad(d: int) -> int:
    return max(triton.next_power_of_2(d), 16)  # 16: tl.dot's smallest K


def input_precision(dtype: torch.dtype) -> str:
    if INTERPRETED or dtype != torch.float32:
        return "ieee"
    # fp32 follows torch's own matmul setting, so "highest" means IEEE fp32 here too.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def num_sms(device_index: int) -> int:
    return _device_properties(device_index).multi_processor_count


def device_key(x: torch.Tensor) -> int:
    """The GPU model in one int, for the autotune keys: a config chosen on one model
    (its shared memory, its SM count) is not reused on another in the same process."""
    if x.device.type != "cuda":
        return 0
    props = _device_properties(x.device.index or 0)
    return (props.major * 10 + props.minor) * 1000 + props.multi_processor_count


@functools.cache
def _device_properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def check_runnable(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
            "kernels is imported; use backend='torch' for CPU training"
        )
