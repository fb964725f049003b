"""Compile the Triton kernels (CLIP / NT-Xent's and SigLIP's) for Hopper (sm_90a) on a
machine without a GPU.

    python -m megabatch.kernels.hopper_compile      # one JSON line per (kernel, config)

Triton compiles ahead of time for any target with the ptxas it ships, so CI can check
what a GPU session would otherwise discover first: that every autotune config compiles,
uses wgmma (Hopper's tensor-core instruction), and how much ptxas spills. Each line also
counts the machine code (cuobjdump -sass): with no GPU at hand, the one measure of how
much work a kernel change adds or removes. Run in a process without TRITON_INTERPRET,
which would replace the kernels by interpreted ones. tests/kernels/test_hopper_compile.py
runs it and checks every line.
"""

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megabatch.kernels.backend import LossMode
from megabatch.kernels.triton_backend import (
    backward,
    backward_tma,
    forward,
    sigmoid_backward,
    sigmoid_forward,
)

D = 512
TARGET = GPUTarget("cuda", 90, 32)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = os.path.join(_BIN, "ptxas")
CUOBJDUMP = os.path.join(_BIN, "cuobjdump")


def _signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = pointers.get(name, "i32")
    return sig


def _compile(kernel, pointers, constexprs, config):
    constexprs = {**constexprs, **config.kwargs}
    pointer_positions = [i for i, n in enumerate(kernel.arg_names) if n in pointers]
    # Device pointers from torch are 16-byte aligned; the JIT assumes as much at run
    # time, and without it Triton does not pipeline the loads.
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_positions}
    src = ASTSource(kernel, _signature(kernel, pointers, constexprs), constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=TARGET, options=options)


def _ptxas_report(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [PTXAS, "--gpu-name", "sm_90a", "-v", path, "-o", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        sass = subprocess.run(
            [CUOBJDUMP, "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", out)]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", out)]
    return {
        "registers": max(regs, default=0),
        "spill_store_bytes": max(spills, default=0),
        **_sass_counts(sass),
    }


def _sass_counts(sass: str) -> dict:
    """Static counts over the kernel's machine code (each instruction once, loops or not):
    a GPU-free proxy for the work a change adds or removes. MUFU is the special-function
    unit (ex2, lg2: an eighth of the FP32 rate on sm_90), BAR a block-wide barrier (what
    cross-warp reductions cost in latency), HGMMA a wgmma."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return {
        "sass_instructions": len(ops),
        "sass_mufu": sum(op == "MUFU" for op in ops),
        "sass_bar": sum(op == "BAR" for op in ops),
        "sass_hgmma": sum(op == "HGMMA" for op in ops),
    }


def main() -> None:
    bf16 = "*bf16"
    common = {"D": D, "D_PAD": D, "stride_x": D, "stride_y": D, "INPUT_PRECISION": "ieee"}
    fwd_pointers = {"X": bf16, "Y": bf16, "SCALE": "*fp32", "LSE_ROW": "*fp32",
                    "POSITIVE": "*fp32", "COL_PART": "*fp32"}  # fmt: skip
    bwd_pointers = {"X": bf16, "Y": bf16, "SCALE": "*fp32", "OUT_MULT": "*fp32",
                    "LSE_ROW": "*fp32", "LSE_COL": "*fp32", "DX": bf16, "GS": "*fp32"}  # fmt: skip
    clip = int(LossMode.CLIP)
    jobs = [
        ("row_logsumexp", forward._row_logsumexp_kernel, fwd_pointers,
         {**common, "MODE": clip, "WITH_COL": True}, forward._FWD_CONFIGS),
        ("row_gradient", backward._row_gradient_kernel, bwd_pointers,
         {**common, "stride_dx": D, "MODE": clip, "DX_COLS": D}, backward._BWD_CONFIGS),
    ]  # fmt: skip
    # SigLIP's two kernels (siglip.py): no log-sum-exp tables, a bias beside the scale.
    sig_pointers = {"X": bf16, "Y": bf16, "SCALE": "*fp32", "BIAS": "*fp32"}
    jobs += [
        ("pairwise_sigmoid_loss", sigmoid_forward._pairwise_sigmoid_loss_kernel,
         {**sig_pointers, "ROW_LOSS": "*fp32"}, common, sigmoid_forward._FWD_CONFIGS),
        ("pairwise_sigmoid_gradient", sigmoid_backward._pairwise_sigmoid_gradient_kernel,
         {**sig_pointers, "OUT_MULT": "*fp32", "DX": bf16, "GT": "*fp32", "GB": "*fp32"},
         {**common, "stride_dx": D, "DX_COLS": D}, sigmoid_backward._BWD_CONFIGS),
    ]  # fmt: skip
    # The experimental TMA backward: descriptors' types carry each config's block shapes.
    tma_constexprs = {"D_PAD": D, "MODE": clip, "DX_COLS": D, "INPUT_PRECISION": "ieee"}
    tma_pointers = {"SCALE": "*fp32", "OUT_MULT": "*fp32", "LSE_ROW": "*fp32",
                    "LSE_COL": "*fp32", "DX": bf16, "GS": "*fp32"}  # fmt: skip
    for name, kernel, pointers, constexprs, configs in jobs:
        for config in configs:
            compiled = _compile(kernel, pointers, constexprs, config)
            _report(name, config, compiled)
    for config in backward_tma._TMA_BWD_CONFIGS:
        c = config.kwargs
        block_dx = D // c["DX_SPLIT"]
        descriptors = {
            "x_desc": f"tensordesc<bf16[{c['BLOCK_M']}, {D}]>",
            "y_desc": f"tensordesc<bf16[{c['BLOCK_N']}, {D}]>",
            "y_dx_desc": f"tensordesc<bf16[{c['BLOCK_N']}, {block_dx}]>",
        }
        kernel = backward_tma._row_gradient_tma_kernel
        compiled = _compile(kernel, {**tma_pointers, **descriptors},
                            {**tma_constexprs, "D": D}, config)  # fmt: skip
        _report("row_gradient_tma", config, compiled)


def _report(name, config, compiled) -> None:
    """One JSON line per compiled kernel."""
    ptx = compiled.asm["ptx"]
    report = {
        "kernel": name,
        "config": {
            **config.kwargs,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        },  # fmt: skip
        "wgmma": "wgmma" in ptx,
        # automatic warp specialisation took (load / MMA / softmax partitions)
        "warp_specialized": "ttg.warp_specialize" in compiled.asm["ttgir"],
        "num_warps": compiled.metadata.num_warps,
        # log2s by the special-function unit, not libdevice's polynomial
        "lg2_approx": "lg2.approx.f32" in ptx,
        "shared_bytes": compiled.metadata.shared,
        **_ptxas_report(ptx),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
