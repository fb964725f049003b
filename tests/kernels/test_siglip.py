"""The fused SigLIP loss against its full-logits reference and its formula, on CPU.

Tolerances (fp32, CPU; Triton runs interpreted, where tl.dot is IEEE fp32):
- the loss to 1e-5 relative (+ 1e-6 absolute): the fused backends and the reference sum
  the same N^2 terms in a different order (tiles), a few fp32 ulps of the sum;
- gradients to 1e-5 of the largest reference entry, with a floor of 1e-7 t (t + |b|): a
  logit l = t s + b carries a rounding of ~1e-7 (t + |b|) (the backends and the reference
  round t s and t x differently), which moves each W = -z sigmoid(-z l) by a quarter of
  that, and dX_i sums N such weights times t / N. dL/dt and dL/db are sums of N^2 weights
  over N, each moved as much: their floor is that much times N (worst case, same signs).
- bf16 / fp16 inputs (torch backend): both sides read the same rounded inputs and sum in
  fp32, so the loss, dL/dt and dL/db agree as for fp32; dX and dY come back in the input
  dtype, one rounding of 2^-8 (bf16) or 2^-11 (fp16) relative to the entry: rtol 1e-2 /
  2e-3 of the largest entry, as for CLIP (test_contrastive.py).
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from megabatch.kernels import siglip_loss, siglip_torch, torch_backend
from megabatch.kernels.reference import siglip_loss_reference
from megabatch.kernels.siglip import SigmoidBackend
from tests.kernels.allocations import largest_allocation

# SigLIP's initial values: t = exp(log 10), b = -10.
T, B = 10.0, -10.0
BACKENDS = ["torch", "triton"]


def _features(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    # Partners correlated with a, as after some training: the diagonal's logits are high.
    b = F.normalize(a + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def _loss_and_grads(fn, a, b, t, bias, **kwargs):
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    t = torch.tensor(t, dtype=dtype, requires_grad=True)
    bias = torch.tensor(bias, dtype=dtype, requires_grad=True)
    loss = fn(a, b, t, bias, **kwargs)
    return (loss, *torch.autograd.grad(loss, (a, b, t, bias)))


def _assert_matches(got, want, t, bias, grad_rtol=1e-5):
    n = got[1].shape[0]
    floor = 1e-7 * t * (t + abs(bias))
    floors = {"loss": 1e-6, "grad a": floor, "grad b": floor}
    names = ["loss", "grad a", "grad b", "grad t", "grad bias"]
    for name, g, w in zip(names, got, want, strict=True):
        assert torch.isfinite(g).all(), name
        if name == "loss":
            atol, rtol = 1e-6, 1e-5
        else:
            rtol = grad_rtol if name in ("grad a", "grad b") else 1e-5
            scalar_floor = 1e-7 * (t + abs(bias)) * n
            atol = max(rtol * w.abs().max().item(), floors.get(name, scalar_floor))
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol, msg=name)


def _check(a, b, t=T, bias=B, backend="torch", **kwargs):
    got = _loss_and_grads(siglip_loss, a, b, t, bias, backend=backend)
    want = _loss_and_grads(siglip_loss_reference, a, b, t, bias)
    _assert_matches(got, want, t, bias, **kwargs)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 5, 64, 130])
@pytest.mark.parametrize("n", [1, 3, 17, 130])
def test_matches_reference(n, d, backend):
    # Triton's interpreter blocks are 128 x 128 x 128: n = 130 leaves ragged row and
    # column blocks, d = 130 takes the K-chunked loads and the others whole rows.
    a, b = _features(n, d, seed=n * 1000 + d)
    _check(a, b, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,bias", [(1.0, 0.0), (3.0, 2.5), (0.0, -1.0)])
def test_other_scales_and_biases(t, bias, backend):
    # t = 0: every logit is b; dL/dt must still be right (it is not divided by t).
    a, b = _features(40, 24, seed=3)
    _check(a, b, t, bias, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [-10.0, 10.0])
def test_large_scale_and_bias_do_not_overflow(bias, backend):
    # Identical features at t = 100: partners' logits are 100 + b, the others spread over
    # about +-40 + b; softplus and sigmoid of them must stay finite and exact.
    a, _ = _features(129, 64)
    b = a.detach().clone().requires_grad_()
    got = _check(a, b, 100.0, bias, backend=backend)
    assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_value_and_gradients_equal_the_formula(backend):
    # Orthonormal pairs (s = I): l_ii = t + b, l_ij = b, so
    #   L = softplus(-(t + b)) + (N - 1) softplus(b),
    #   dL/db = -sigmoid(-(t + b)) + (N - 1) sigmoid(b),  dL/dt = -sigmoid(-(t + b)).
    n, t, bias = 3, 2.0, -1.0
    eye = torch.eye(n)
    a, b = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    got = _loss_and_grads(siglip_loss, a, b, t, bias, backend=backend)

    def softplus(v):
        return math.log1p(math.exp(v))

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    want_loss = softplus(-(t + bias)) + (n - 1) * softplus(bias)
    want_db = -sigmoid(-(t + bias)) + (n - 1) * sigmoid(bias)
    want_dt = -sigmoid(-(t + bias))
    torch.testing.assert_close(got[0], torch.tensor(want_loss))
    torch.testing.assert_close(got[3], torch.tensor(want_dt))
    torch.testing.assert_close(got[4], torch.tensor(want_db))
    # dA = t G B with G = (sigmoid(l) - I) / N: row i is t / N (W_ii e_i + sum_j!=i W_ij e_j).
    w = torch.full((n, n), sigmoid(bias))
    w.fill_diagonal_(-sigmoid(-(t + bias)))
    torch.testing.assert_close(got[1], t / n * w)
    torch.testing.assert_close(got[2], t / n * w.t())


def test_torch_backend_small_odd_tiles(monkeypatch):
    # 3 x 7 tiles: sums across row and column tiles, and partners on tile edges (one
    # 1024 x 1024 tile holds these whole batches).
    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 3)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 7)
    a, b = _features(100, 32)
    _check(a, b)


@pytest.mark.parametrize(
    "blocks",
    [
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": "whole rows"},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16},
        {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "DX_SPLIT": 2},
    ],
    ids=["whole rows", "k-chunked", "dx split"],
)
def test_triton_loading_schemes_and_ragged_tiles(blocks, monkeypatch):
    # Each loading scheme where the sweep runs the other (d = 150: whole rows padded to
    # 256; d = 40 in K-chunks of 16), on ragged tiles of N = 100; and with dX's columns
    # split between two programs (d = 150: the second half ragged).
    from megabatch.kernels.triton_backend import common

    blocks = dict(blocks)
    monkeypatch.setattr(common, "INTERPRET_DX_SPLIT", blocks.pop("DX_SPLIT", 1))
    whole = blocks["BLOCK_K"] == "whole rows"
    blocks["BLOCK_K"] = common.WHOLE_ROWS if whole else blocks["BLOCK_K"]
    monkeypatch.setattr(common, "INTERPRET_BLOCKS", blocks)
    a, b = _features(100, 40 if blocks["BLOCK_K"] == 16 else 150, seed=7)
    _check(a, b, backend="triton")


def test_torch_backend_two_pass_backward(monkeypatch):
    # The passes that ranks run (dY from a second pass with X and Y swapped), in one
    # process: the torch backend with its column gradient switched off.
    monkeypatch.setattr(siglip_torch.BACKEND, "supports_column_gradient", False)
    a, b = _features(50, 16, seed=9)
    _check(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_torch_backend(dtype):
    a, b = _features(300, 64, dtype=dtype)
    got = _check(a, b, grad_rtol=1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype


@pytest.mark.parametrize("two_pass", [False, True], ids=["one pass", "two passes"])
def test_gradcheck_float64_torch_backend(two_pass, monkeypatch):
    monkeypatch.setattr(siglip_torch.BACKEND, "supports_column_gradient", not two_pass)
    a, b = _features(6, 5, dtype=torch.float64)
    t = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y, t, b: siglip_loss(x, y, t, b, backend="torch"), (a, b, t, bias)
    )


def test_scale_and_bias_as_floats_or_tensors():
    a, b = _features(16, 8)
    loss_float = siglip_loss(a, b, T, B, backend="torch")
    t, bias = torch.tensor(T, requires_grad=True), torch.tensor([B], requires_grad=True)
    loss_tensor = siglip_loss(a, b, t, bias, backend="torch")
    torch.testing.assert_close(loss_float, loss_tensor)
    grad_t, grad_b = torch.autograd.grad(loss_tensor, (t, bias))
    assert grad_t.shape == t.shape and grad_b.shape == bias.shape
    # A learnt log-scale: the caller passes exp(log t), and its gradient flows through.
    log_t = torch.tensor(math.log(T), requires_grad=True)
    (grad_log_t,) = torch.autograd.grad(siglip_loss(a, b, log_t.exp(), B), log_t)
    torch.testing.assert_close(grad_log_t, grad_t * T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_n_by_n_allocation(backend, monkeypatch):
    """Neither the forward nor the backward allocates an N x N tensor: every tensor made
    through the torch dispatcher is inspected (test_contrastive.py's probe); with
    N = 300 > D, any of >= N * N / 2 elements would be quadratic."""
    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 64)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 64)
    n = 300

    a, b = _features(n, 16)
    with largest_allocation() as largest:
        siglip_loss(a, b, T, B, backend=backend).backward()
    assert largest[0] < n * n // 2, largest
    with largest_allocation() as largest:  # the same probe sees the reference's logits
        siglip_loss(a, b, T, B, backend="reference").backward()
    assert largest[0] >= n * n


BAD_INPUTS = [
    ("not 2-D", lambda a, b: (a[0], b[0], T, B), "2-D"),
    ("shapes differ", lambda a, b: (a, b[:-1], T, B), "shapes differ"),
    ("dims differ", lambda a, b: (a, b[:, :-1], T, B), "shapes differ"),
    ("empty", lambda a, b: (a[:0], b[:0], T, B), "N == 0"),
    ("dtypes differ", lambda a, b: (a, b.double(), T, B), "dtypes differ"),
    ("integer", lambda a, b: (a.long(), b.long(), T, B), "float32"),
    ("nan scale", lambda a, b: (a, b, float("nan"), B), "logit_scale must be finite"),
    ("inf bias", lambda a, b: (a, b, T, torch.tensor(float("-inf"))), "logit_bias must be finite"),
    ("vector scale", lambda a, b: (a, b, torch.ones(2), B), "logit_scale must be a scalar"),
    ("string bias", lambda a, b: (a, b, T, "-10"), "logit_bias must be a float"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_value_error(case):
    a, b = _features(4, 8)
    _, make, message = case
    with pytest.raises(ValueError, match=message) as caught:
        siglip_loss(*make(a.detach(), b.detach()), backend="torch")
    assert "\n" not in str(caught.value)


def test_backend_and_group_errors():
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        siglip_loss(a, b, T, B, backend="cuda")
    with pytest.raises(ValueError, match="float64"):
        siglip_loss(a.double(), b.double(), T, B, backend="triton")
    with pytest.raises(ValueError, match="takes no process_group"):
        siglip_loss(a, b, T, B, process_group=object(), backend="reference")
    with pytest.raises(ValueError, match="siglip_loss: process_group given but"):
        siglip_loss(a, b, T, B, process_group=object(), backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_devices_differ_raises():
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="different devices"):
        siglip_loss(a, b.cuda(), T, B)


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_provides_the_interface(name):
    from megabatch.kernels.triton_backend import sigmoid

    backend = {"torch": siglip_torch.BACKEND, "triton": sigmoid.BACKEND}[name]
    assert isinstance(backend, SigmoidBackend) and backend.name == name
    for method in ("pairwise_sigmoid_loss", "pairwise_sigmoid_gradient"):
        want = list(inspect.signature(getattr(SigmoidBackend, method)).parameters.values())
        got = list(inspect.signature(getattr(backend, method)).parameters.values())
        # Same names, kinds and defaults as the protocol's (less self); annotations aside.
        assert [(p.name, p.kind, p.default) for p in got] == [
            (p.name, p.kind, p.default) for p in want[1:]
        ], method
