"""The Triton backend on a CUDA GPU: half precision, TF32, and large N.

Tolerances, each against the reference fed the same (rounded) inputs, its logits in fp32:
- bf16 / fp16 inputs: the kernels multiply the inputs exactly into fp32 accumulators, so
  the loss agrees to fp32 summation error (1e-4 relative). Gradients go through W cast to
  the input dtype for the tensor cores and come back in that dtype: two roundings of
  2^-8 (bf16) or 2^-11 (fp16) relative, so rtol 2e-2 / 4e-3 of the largest entry.
- fp32 with TF32: inputs are rounded to 10 mantissa bits (2^-11 relative) inside the dot,
  so logits move by ~1e-4 * s: the loss to 2e-3, gradients to 1e-2 of the largest entry.
- fp32 without TF32 (IEEE): as on CPU, 1e-5.
"""

import pytest
import torch
import triton

from megabatch.kernels import clip_loss, ntxent_loss
from megabatch.kernels.reference import clip_loss_reference, ntxent_loss_reference
from megabatch.kernels.triton_backend import backward, backward_tma, common, forward
from tests.kernels.features import paired_features, spread_features

pytestmark = pytest.mark.gpu

LOSSES = {
    "clip": (clip_loss, clip_loss_reference, 1 / 0.07),
    "ntxent": (ntxent_loss, ntxent_loss_reference, 0.1),
}
TOLERANCES = {  # dtype: (loss rtol, gradient rtol of the largest entry)
    "bf16": (1e-4, 2e-2),
    "fp16": (1e-4, 4e-3),
    "tf32": (2e-3, 1e-2),
    "ieee": (1e-5, 1e-5),
}
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "tf32": torch.float32,
    "ieee": torch.float32,
}


@pytest.fixture
def tf32_matmul(request):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _features(n, d, dtype, seed=0):
    return paired_features(n, d, dtype, device="cuda", seed=seed)


def _loss_and_grads(fn, a, b, s, **kwargs):
    scale = torch.tensor(s, device="cuda", requires_grad=True)
    loss = fn(a, b, scale, **kwargs)
    return (loss, *torch.autograd.grad(loss, (a, b, scale)))


def _check(loss_name, precision, n, d):
    a, b = _features(n, d, DTYPES[precision], seed=n + d)
    _assert_matches_reference(loss_name, precision, a, b, LOSSES[loss_name][2])


def _assert_matches_reference(loss_name, precision, a, b, s):
    fn, ref, _ = LOSSES[loss_name]
    loss_rtol, grad_rtol = TOLERANCES[precision]
    # Where the exact gradient is 0 (N = 1: the loss is 0 whatever the features), the
    # tolerance is relative to the gradient's natural size, multiplier / 2N for unit
    # features, not to the reference's rounding noise.
    natural = (s if loss_name == "clip" else 1 / s) / (2 * a.shape[0])
    got = _loss_and_grads(fn, a, b, s, backend="triton")
    # The reference never uses TF32: it is the exact fp32 answer.
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    want = _loss_and_grads(ref, a, b, s)
    torch.backends.cuda.matmul.allow_tf32 = before
    torch.testing.assert_close(got[0], want[0], rtol=loss_rtol, atol=0, msg="loss")
    for name, g, w in zip(["grad a", "grad b", "grad scale"], got[1:], want[1:], strict=True):
        assert g.dtype == w.dtype, name
        atol = grad_rtol * max(w.abs().max().item(), natural)
        torch.testing.assert_close(g.float(), w.float(), rtol=grad_rtol, atol=atol, msg=name)


@pytest.mark.parametrize("tf32_matmul", [False], indirect=True)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("precision", ["bf16", "fp16", "ieee"])
@pytest.mark.parametrize("n,d", [(1, 3), (129, 65), (4096, 512), (16384, 256)])
def test_matches_reference(n, d, precision, loss_name, tf32_matmul):
    _check(loss_name, precision, n, d)


@pytest.mark.parametrize("tf32_matmul", [True], indirect=True)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_tf32_matches_reference(loss_name, tf32_matmul):
    _check(loss_name, "tf32", 4096, 512)


# Every autotune config once, whichever the autotuner would keep here: a config that
# loses the race on this GPU and shape can win on another, so each must be right. N =
# 1,000 leaves ragged row and column tiles for every block shape.
def _only(monkeypatch, module, tuned_name, kernel, config):
    """module's launcher runs `kernel` with `config` alone where it would autotune."""
    monkeypatch.setattr(module, tuned_name, triton.autotune([config], key=["D"])(kernel))


def _config_id(config):
    kw = {**config.kwargs, "warps": config.num_warps, "stages": config.num_stages}
    return "-".join(f"{k}{'whole' if v == common.WHOLE_ROWS else v}" for k, v in kw.items())


@pytest.mark.parametrize("features", ["typical", "spread"])
@pytest.mark.parametrize("config", forward._FWD_CONFIGS, ids=_config_id)
def test_every_forward_config_matches_reference(config, features, monkeypatch):
    # "spread": logits at scale 100 whose far columns sit ~190 below the top of tiles
    # they share with near ones, so ONE_EXP configs take their per-tile fallback, here
    # where ex2.approx flushes what falls below 2^-126 to zero (the CPU interpreter
    # keeps subnormals).
    _only(monkeypatch, forward, "_row_logsumexp_tuned", forward._row_logsumexp_kernel, config)
    if features == "typical":
        a, b = _features(1000, 512, torch.bfloat16, seed=3)
        s = LOSSES["clip"][2]
    else:
        a, b = (t.detach().bfloat16().requires_grad_()
                for t in spread_features(1000, 512, far_from=900, device="cuda"))  # fmt: skip
        s = 100.0
    _assert_matches_reference("clip", "bf16", a, b, s)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("config", backward._BWD_CONFIGS, ids=_config_id)
def test_every_backward_config_matches_reference(config, loss_name, monkeypatch):
    _only(monkeypatch, backward, "_row_gradient_tuned", backward._row_gradient_kernel, config)
    a, b = _features(1000, 512, torch.bfloat16, seed=4)
    _assert_matches_reference(loss_name, "bf16", a, b, LOSSES[loss_name][2])


@pytest.mark.parametrize("loss_name", LOSSES)
def test_65536_matches_torch_backend(loss_name):
    # The reference would need ~70 GB here; the tiled torch backend (fp32 on the GPU,
    # O(N) memory) is the comparison. Tolerances as for bf16 above.
    fn, _, s = LOSSES[loss_name]
    a, b = _features(65536, 512, torch.bfloat16)
    got = _loss_and_grads(fn, a, b, s, backend="triton")
    want = _loss_and_grads(fn, a, b, s, backend="torch")
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(
            g.float(), w.float(), rtol=2e-2, atol=2e-2 * w.abs().max().item()
        )


@pytest.mark.parametrize("loss_name", LOSSES)
def test_no_quadratic_memory_at_65536(loss_name):
    # Scratch beyond the inputs and gradients: O(N) statistics + CLIP's one (programs, N)
    # fp32 table in the forward (132 x 65,536 x 4 B = 35 MB on an H200), freed before the
    # gradients exist: so the forward's peak and the backward's are taken apart. NT-Xent's
    # z1 and z2 are halves of one tensor (the trainer's layout): [z1; z2] is not copied.
    fn, _, s = LOSSES[loss_name]
    a, b = _features(65536, 512, torch.bfloat16)
    if loss_name == "ntxent":
        both = torch.cat([a, b]).detach()
        del a, b
        a, b = both[:65536].requires_grad_(), both[65536:].requires_grad_()
    _loss_and_grads(fn, a, b, s, backend="triton")  # autotuning clones buffers
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    scale = torch.tensor(s, device="cuda", requires_grad=True)
    loss = fn(a, b, scale, backend="triton")
    forward_extra = torch.cuda.max_memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    ga, gb, _ = torch.autograd.grad(loss, (a, b, scale))
    outputs = ga.numel() * ga.element_size() + gb.numel() * gb.element_size()
    backward_extra = torch.cuda.max_memory_allocated() - before - outputs
    assert max(forward_extra, backward_extra) < 64 * 2**20, (forward_extra, backward_extra)


# The experimental TMA + warp-specialised backward (MEGABATCH_TRITON_WS=1). A new kernel
# path can hang on the GPU: the thread-method timeout then ends this test's process
# (with -n, only its worker) instead of blocking the whole check.
@pytest.mark.timeout(150, method="thread")
@pytest.mark.parametrize("loss_name", LOSSES)
def test_tma_backward_matches_the_plain_kernel(loss_name, monkeypatch):
    fn, _, s = LOSSES[loss_name]
    a, b = _features(16384, 512, torch.bfloat16)
    want = _loss_and_grads(fn, a, b, s, backend="triton")
    monkeypatch.setenv(backward_tma.TMA_BACKWARD_ENV, "1")
    assert backward_tma.use_tma_backward(a, b)
    got = _loss_and_grads(fn, a, b, s, backend="triton")
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the same forward
    # Both gradients are fp32 sums in different orders, rounded to bf16 once.
    _, grad_rtol = TOLERANCES["bf16"]
    for g, w in zip(got[1:], want[1:], strict=True):
        atol = grad_rtol * w.abs().max().item()
        torch.testing.assert_close(g.float(), w.float(), rtol=grad_rtol, atol=atol)
