"""Time each pass of the Triton CLIP loss apart, with every autotune candidate's time.

    python -m megabatch.kernels.benchmark_passes            # CUDA only: N = 65,536, D = 512, bf16

The fused loss is three launches (kernels/contrastive.py): the forward row_logsumexp
(2 N² D FLOPs: S once) and two row_gradient passes (4 N² D each: S again, then W @ Y).
This prints, per pass, the median time, the rate on the FLOPs it really does, the config
the autotuner kept and the time of every candidate it tried, beside two rows that are
not passes of the loss: the forward without CLIP's column statistics (what those cost)
and a cuBLAS product S = A Bᵀ of the same shape (a ceiling for one pass over S). Writes
the tables to docs/benchmarks-passes.md (--output).

Then, written after the rest so that a failure or a hang there loses none of it, the dA
pass once more through the experimental TMA + warp-specialised backward
(MEGABATCH_TRITON_WS=1; kernels/triton_backend/backward_tma.py), with its candidates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from megabatch.kernels.backend import LossMode
from megabatch.kernels.triton_backend import backward, backward_tma, common, forward


def _features(n: int, d: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    a = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1)
    b = F.normalize(a + torch.randn(n, d, device="cuda", generator=g), dim=1)
    return a.bfloat16(), b.bfloat16()


def _config_name(config) -> str:
    kw = config.kwargs
    block_k = kw.get("BLOCK_K", common.WHOLE_ROWS)  # the TMA kernel always loads whole rows
    k = "whole" if block_k == common.WHOLE_ROWS else str(block_k)
    split = f", dX split {kw['DX_SPLIT']}" if kw.get("DX_SPLIT", 1) > 1 else ""
    specialised = ", warp-specialised" if kw.get("WARP_SPECIALIZE") else ""
    one_exp = ", one exp2" if kw.get("ONE_EXP") else ""
    return (
        f"{kw['BLOCK_M']}x{kw['BLOCK_N']}, K {k}, {config.num_warps} warps, "
        f"{config.num_stages} stages{split}{specialised}{one_exp}"
    )


def _candidates(tuned) -> str:
    timings = getattr(tuned, "configs_timings", None) or {}
    ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if kv[1] else float("inf"))
    return "; ".join(f"{_config_name(c)}: {t[0]:.2f} ms" for c, t in ranked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megabatch.kernels.benchmark_passes",
        description="Per-pass times of the Triton CLIP loss, with the autotune candidates.",
    )
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-passes.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    n, d = args.n, args.dim
    a, b = _features(n, d)
    scale = torch.tensor([1 / 0.07], device="cuda")
    out_mult = torch.tensor([1.0 / (2 * n)], device="cuda") * scale
    mode = LossMode.CLIP

    def forward_pass():
        return forward.row_logsumexp(a, b, scale, row_offset=0, mode=mode, with_col=True)

    lse_rows, _, lse_cols = forward_pass()  # autotunes the forward at this shape
    fwd_candidates = _candidates(forward._row_logsumexp_tuned)
    fwd_config = forward._row_logsumexp_tuned.best_config

    def forward_rows_only():  # the same pass without CLIP's column statistics
        return forward.row_logsumexp(a, b, scale, row_offset=0, mode=mode, with_col=False)

    forward_rows_only()  # autotunes this variant (its own key)

    def grad_a():
        return backward.row_gradient(
            a, b, scale, out_mult, lse_rows, lse_cols, row_offset=0, mode=mode
        )

    def grad_b():
        return backward.row_gradient(
            b, a, scale, out_mult, lse_cols, lse_rows, row_offset=0, mode=mode
        )

    grad_a()  # autotunes the backward; grad_b shares its key (D, N bucket, mode)
    bwd_candidates = _candidates(backward._row_gradient_tuned)
    bwd_config = backward._row_gradient_tuned.best_config

    def gemm():
        return a @ b.T  # (N, N) bf16: the product alone, written out

    s_flops = 2.0 * n * n * d
    rows = [
        ("row_logsumexp (S, row + column lse)", forward_pass, s_flops, _config_name(fwd_config)),
        (
            "row_logsumexp, rows only (not a pass of the loss)",
            forward_rows_only,
            s_flops,
            _config_name(forward._row_logsumexp_tuned.best_config),
        ),
        ("row_gradient dA (S again, W @ B)", grad_a, 2 * s_flops, _config_name(bwd_config)),
        ("row_gradient dB (S again, W^T @ A)", grad_b, 2 * s_flops, _config_name(bwd_config)),
        ("cuBLAS S = A B^T, bf16 out (ceiling)", gemm, s_flops, "torch.matmul"),
    ]
    lines = [
        "| pass | ms | TFLOP/s (its own FLOPs) | config |",
        "|---|---:|---:|---|",
    ]
    total = 0.0
    for name, fn, flops, config in rows:
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        if name.startswith("row_gradient") or "column lse" in name:
            total += ms
        lines.append(f"| {name} | {ms:.2f} | {flops / ms / 1e9:.1f} | {config} |")
    effective = 8.0 * n * n * d / total / 1e9
    lines.append(f"| sum of the three passes | {total:.2f} | {effective:.1f} (8N²D) | |")
    table = "\n".join(lines)
    candidates = (
        f"Forward candidates (median ms): {fwd_candidates}\n\n"
        f"Backward candidates (median ms, dA pass): {bwd_candidates}"
    )
    print(table)
    print(candidates)
    head = (
        f"# Per-pass kernel times\n\n{dt.date.today().isoformat()}, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}. N = {n:,}, D = {d}, "
        f"bf16. Command: `python -m megabatch.kernels.benchmark_passes "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
        f"{table}\n\n{candidates}\n"
    )
    _write(args.output, head)
    experiment = _tma_backward(grad_a, a, b, 2 * s_flops)
    print(experiment)
    _write(args.output, f"{head}\n{experiment}\n")
    return 0


def _write(path: Path, body: str) -> None:
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(body)
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)


def _tma_backward(grad_a, a, b, flops: float) -> str:
    """The dA pass through the experimental TMA + warp-specialised kernel, as a table."""
    title = "## Experimental: the dA pass through the TMA backward (MEGABATCH_TRITON_WS=1)\n\n"
    os.environ[backward_tma.TMA_BACKWARD_ENV] = "1"
    try:
        if not backward_tma.use_tma_backward(a, b):  # else grad_a would time the plain kernel
            return f"{title}not applicable to these features (TMA alignment or width)"
        grad_a()  # autotunes the TMA kernel at this shape
        ms = do_bench(grad_a, warmup=25, rep=200, return_mode="median")
    except Exception as exc:  # a new kernel path: report it, keep the tables above
        return f"{title}failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        del os.environ[backward_tma.TMA_BACKWARD_ENV]
    tuned = backward_tma._row_gradient_tma_tuned
    return (
        f"{title}| pass | ms | TFLOP/s (its own FLOPs) | config |\n|---|---:|---:|---|\n"
        f"| row_gradient dA, TMA | {ms:.2f} | {flops / ms / 1e9:.1f} | "
        f"{_config_name(tuned.best_config)} |\n\nCandidates (median ms): {_candidates(tuned)}"
    )


if __name__ == "__main__":
    sys.exit(main())
