"""The Triton backend's own machinery, apart from the losses: the forward's column-partial
merge and the autotuner's candidate pruning and keys (kernels/triton_backend/). Runs on
CPU: nothing here launches a kernel."""

import math
from types import SimpleNamespace

import pytest
import torch

from megabatch.kernels.triton_backend import BACKEND, backward, backward_tma, common, forward


def test_column_partials_merge_in_place_like_logsumexp():
    # (programs, N) log2-sum-exp2 partials -> natural-log column lse; a program that saw no
    # rows leaves -inf, and a column nobody saw stays -inf.
    g = torch.Generator().manual_seed(3)
    part = torch.randn(6, 50, generator=g) * 40
    part[2] = float("-inf")
    part[:, 7] = float("-inf")
    want = torch.logsumexp(part.double() * math.log(2.0), dim=0)
    got = forward._merge_column_partials_(part.clone())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    assert got[7] == float("-inf")


def test_autotune_splits_dx_columns_only_for_wide_rows():
    bf16 = {"X": torch.empty(0, dtype=torch.bfloat16)}

    def splits(d_pad):
        kept = common.prune_configs(backward._BWD_CONFIGS, bf16, D_PAD=d_pad,
                                    DX_COLS=min(d_pad, 512), INPUT_PRECISION="ieee")  # fmt: skip
        return [c for c in kept if c.kwargs["DX_SPLIT"] == 2]

    assert splits(512) and splits(256)
    assert not splits(128)


@pytest.mark.parametrize(
    "dtype,d_pad,whole_rows_kept",
    [(torch.bfloat16, 512, True), (torch.float32, 256, True), (torch.float32, 512, False),
     (torch.bfloat16, 1024, False)],
)  # fmt: skip
def test_autotune_keeps_whole_rows_only_where_they_fit(dtype, d_pad, whole_rows_kept):
    # Whole-rows configs hold X's block and a Y tile per stage in shared memory: sized for
    # rows of 1 KB. Beyond that they cannot launch, so they must not even be compiled.
    x = {"X": torch.empty(0, dtype=dtype)}
    kept = common.prune_configs(backward._BWD_CONFIGS, x, D_PAD=d_pad, DX_COLS=min(d_pad, 512),
                                INPUT_PRECISION="tf32")  # fmt: skip
    whole = [c for c in kept if c.kwargs["BLOCK_K"] == common.WHOLE_ROWS]
    assert bool(whole) == whole_rows_kept
    chunked = [c for c in backward._BWD_CONFIGS if c.kwargs["BLOCK_K"] != common.WHOLE_ROWS]
    assert len(kept) - len(whole) == len(chunked)


@pytest.mark.parametrize("with_col", [True, False])
def test_autotune_offers_one_exp_only_with_column_statistics(with_col):
    # Without column statistics (NT-Xent) a ONE_EXP config is the same kernel as its twin.
    bf16 = {"X": torch.empty(0, dtype=torch.bfloat16)}
    kept = common.prune_configs(forward._FWD_CONFIGS, bf16, D_PAD=512, WITH_COL=with_col,
                                INPUT_PRECISION="ieee")  # fmt: skip
    offered = sum(c.kwargs["ONE_EXP"] for c in forward._FWD_CONFIGS)
    kept_one_exp = sum(c.kwargs["ONE_EXP"] for c in kept)
    assert offered > 0 and kept_one_exp == (offered if with_col else 0)
    assert len(kept) - kept_one_exp == len(forward._FWD_CONFIGS) - offered


def test_autotune_choices_are_per_gpu_model(monkeypatch):
    # One process may drive two GPU models: a config tuned on one (its shared memory,
    # its SM count) must not be replayed on the other.
    models = {0: SimpleNamespace(major=9, minor=0, multi_processor_count=132),
              1: SimpleNamespace(major=8, minor=0, multi_processor_count=108)}  # fmt: skip
    monkeypatch.setattr(common, "_device_properties", models.__getitem__)
    on = [SimpleNamespace(device=torch.device("cuda", i)) for i in (0, 1)]
    assert common.device_key(on[0]) != common.device_key(on[1])
    assert common.num_sms(1) == 108
    for tuned in (forward._row_logsumexp_tuned, backward._row_gradient_tuned,
                  backward_tma._row_gradient_tma_tuned):  # fmt: skip
        assert "DEVICE_KEY" in tuned.keys


@pytest.mark.parametrize("pass_name", ["forward", "backward"])
def test_autotune_times_nothing_for_ieee_fp32(pass_name):
    # The CUDA-core path: one config, so no timing runs (tensor-core shapes are moot there).
    if pass_name == "forward":
        candidates, tuned = forward._FWD_CONFIGS, forward._row_logsumexp_tuned
    else:
        candidates, tuned = backward._BWD_CONFIGS, backward._row_gradient_tuned
    fp32 = {"X": torch.empty(0, dtype=torch.float32)}
    kept = common.prune_configs(candidates, fp32, D_PAD=256, DX_COLS=256, WITH_COL=True,
                                INPUT_PRECISION="ieee")  # fmt: skip
    assert len(kept) == 1 and kept[0].kwargs["BLOCK_K"] != common.WHOLE_ROWS
    assert kept[0].kwargs.get("DX_SPLIT", 1) == 1
    bf16 = {"X": torch.empty(0, dtype=torch.bfloat16)}
    kept = common.prune_configs(candidates, bf16, D_PAD=256, DX_COLS=256, WITH_COL=True,
                                INPUT_PRECISION="ieee")  # fmt: skip
    assert len(kept) == len(candidates)
    # fp32 with TF32 on and off are two shapes classes: neither reuses the other's choice.
    assert "INPUT_PRECISION" in tuned.keys


def test_no_column_gradient():
    # The interface's flag and the launcher agree: dY would need atomics across programs.
    assert not BACKEND.supports_column_gradient
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="column gradient"):
        BACKEND.row_gradient(x, x, x[0, :1], x[0, :1], x[:, 0], x[:, 0], row_offset=0,
                             mode=0, with_col_grad=True)  # fmt: skip
