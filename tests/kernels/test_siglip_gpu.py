"""SigLIP's Triton backend on a CUDA GPU: half precision, every autotune config, large N.

Tolerances, against the reference fed the same (rounded) inputs, its logits in fp32, as
for CLIP (test_contrastive_gpu.py): bf16 / fp16 inputs are multiplied exactly into fp32,
so the loss agrees to fp32 summation error (1e-4 relative); gradients go through W cast
to the input dtype for the tensor cores and come back in that dtype: two roundings of
2^-8 (bf16) or 2^-11 (fp16), so rtol 2e-2 / 4e-3 of the largest entry. fp32 without TF32
(IEEE): as on CPU, 1e-5.
"""

import pytest
import torch
import triton

from megabatch.kernels import siglip_loss
from megabatch.kernels.reference import siglip_loss_reference
from megabatch.kernels.triton_backend import sigmoid_backward, sigmoid_forward
from tests.kernels.features import paired_features

pytestmark = pytest.mark.gpu

T, B = 10.0, -10.0
TOLERANCES = {"bf16": (1e-4, 2e-2), "fp16": (1e-4, 4e-3), "ieee": (1e-5, 1e-5)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "ieee": torch.float32}


@pytest.fixture
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _features(n, d, dtype, seed=0):
    return paired_features(n, d, dtype, device="cuda", seed=seed)


def _loss_and_grads(fn, a, b, **kwargs):
    t = torch.tensor(T, device="cuda", requires_grad=True)
    bias = torch.tensor(B, device="cuda", requires_grad=True)
    loss = fn(a, b, t, bias, **kwargs)
    return (loss, *torch.autograd.grad(loss, (a, b, t, bias)))


def _assert_close(got, want, precision):
    loss_rtol, grad_rtol = TOLERANCES[precision]
    torch.testing.assert_close(got[0], want[0], rtol=loss_rtol, atol=1e-6, msg="loss")
    names = ["grad a", "grad b", "grad t", "grad bias"]
    for name, g, w in zip(names, got[1:], want[1:], strict=True):
        assert g.dtype == w.dtype, name
        atol = grad_rtol * max(w.abs().max().item(), T / (2 * got[1].shape[0]))
        torch.testing.assert_close(g.float(), w.float(), rtol=grad_rtol, atol=atol, msg=name)


def _check(a, b, precision):
    _assert_close(
        _loss_and_grads(siglip_loss, a, b, backend="triton"),
        _loss_and_grads(siglip_loss_reference, a, b),
        precision,
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16", "ieee"])
@pytest.mark.parametrize("n,d", [(1, 3), (129, 65), (4096, 512)])
def test_matches_reference(n, d, precision, no_tf32):
    _check(*_features(n, d, DTYPES[precision], seed=n + d), precision)


# Every autotune config once, whichever the autotuner would keep here; N = 1,000 leaves
# ragged row and column tiles for every block shape.
def _only(monkeypatch, module, tuned_name, kernel, config):
    monkeypatch.setattr(module, tuned_name, triton.autotune([config], key=["D"])(kernel))


@pytest.mark.parametrize("config", sigmoid_forward._FWD_CONFIGS, ids=str)
def test_every_forward_config_matches_reference(config, monkeypatch):
    kernel = sigmoid_forward._pairwise_sigmoid_loss_kernel
    _only(monkeypatch, sigmoid_forward, "_pairwise_sigmoid_loss_tuned", kernel, config)
    _check(*_features(1000, 512, torch.bfloat16, seed=3), "bf16")


@pytest.mark.parametrize("config", sigmoid_backward._BWD_CONFIGS, ids=str)
def test_every_backward_config_matches_reference(config, monkeypatch):
    kernel = sigmoid_backward._pairwise_sigmoid_gradient_kernel
    _only(monkeypatch, sigmoid_backward, "_pairwise_sigmoid_gradient_tuned", kernel, config)
    _check(*_features(1000, 512, torch.bfloat16, seed=4), "bf16")


def test_65536_matches_torch_backend():
    # The reference would need ~70 GB; the tiled torch backend (fp32 on the GPU) compares.
    a, b = _features(65536, 512, torch.bfloat16)
    _assert_close(
        _loss_and_grads(siglip_loss, a, b, backend="triton"),
        _loss_and_grads(siglip_loss, a, b, backend="torch"),
        "bf16",
    )
