"""The Triton kernels compile for Hopper (sm_90a) without a GPU (the report of
``python -m megabatch.kernels.hopper_compile``, kernels/hopper_compile.py): every autotune config of
the bf16 CLIP path (the benchmarked one) and of SigLIP's two kernels must compile, use wgmma, fit Hopper's 228 KB of
shared memory per block, and spill at most a little (ptxas spill stores under 1 KB); the
forward's column merge must take its log2s from the special-function unit; the
experimental TMA backward's configs asking for warp specialisation must get it."""

import json
import os
import subprocess
import sys

import pytest

from megabatch.kernels.triton_backend import (
    backward,
    backward_tma,
    forward,
    sigmoid_backward,
    sigmoid_forward,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_all_configs_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "megabatch.kernels.hopper_compile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    configs = forward._FWD_CONFIGS + backward._BWD_CONFIGS + backward_tma._TMA_BWD_CONFIGS
    configs += sigmoid_forward._FWD_CONFIGS + sigmoid_backward._BWD_CONFIGS
    assert len(reports) == len(configs)
    assert {"pairwise_sigmoid_loss", "pairwise_sigmoid_gradient"} <= {r["kernel"] for r in reports}
    for r in reports:
        # The experimental TMA backward: warp-specialised where its config asks for it.
        assert r["warp_specialized"] == r["config"].get("WARP_SPECIALIZE", False), r
        assert r["wgmma"], r
        assert r["shared_bytes"] <= 228 * 1024, r
        assert r["spill_store_bytes"] < 1024, r
        if r["kernel"] == "row_logsumexp":  # the column merge's log2s (_log2_fast)
            assert r["lg2_approx"], r
