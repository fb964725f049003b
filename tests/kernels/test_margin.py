"""The tiled margin contrastive loss against its full-distances reference, on CPU.

Tolerances. fp32: the tiles and the reference compute the same D_ij^2 = |a|^2 + |b|^2 -
2 a.b and the same sums, in a different order, so they agree to a few fp32 ulps: the loss
(about 0.1 to 1 here) to 1e-5 absolute and relative, gradients to 1e-5 relative with a
floor of 1e-5 of the largest reference gradient entry (entries near 0 are differences
of sums of that size). Measured, the sweep's gradients use half of that at D = 3 (N = 129
and 1000: some negatives 1e-3 apart, where w = h / D is large and the expansion's
rounding shows most) and under 1% of it elsewhere.
bf16 / fp16: both sides read the same rounded inputs and accumulate in fp32, so the loss
still agrees to 1e-5; the gradients come back in the input dtype, one rounding of 2^-9
(bf16) or 2^-12 (fp16) relative each, hence rtol 1e-2 and 2e-3, with the same floor
scaled alike (as test_contrastive.py); measured, both round the same fp32 values and
differ by under 0.1% of that. fp64: gradcheck, away from the kinks at D = 0 and D = m.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megabatch.kernels import margin_contrastive_loss, torch_backend
from megabatch.kernels.reference import margin_contrastive_loss_reference
from tests.kernels.allocations import largest_allocation

MARGIN = 1.4  # unit rows: a negative's distance is about sqrt(2), so part of them fall inside


def _features(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    # Partners correlated with a: positives closer than negatives, as after some training.
    b = F.normalize(a + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def _loss_and_grads(a, b, margin=MARGIN, **kwargs):
    fn = kwargs.pop("fn", margin_contrastive_loss)
    loss = fn(a, b, margin, **kwargs)
    return (loss, *torch.autograd.grad(loss, (a, b)))


def _reference(a, b, margin=MARGIN):
    return _loss_and_grads(a, b, margin, fn=margin_contrastive_loss_reference)


def _assert_matches(got, want, grad_rtol=1e-5):
    for name, g, w in zip(["loss", "grad a", "grad b"], got, want, strict=True):
        assert torch.isfinite(g).all(), name
        atol = 1e-5 if name == "loss" else grad_rtol * w.abs().max().item()
        rtol = 1e-5 if name == "loss" else grad_rtol
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("d", [3, 65, 256])
@pytest.mark.parametrize("n", [1, 2, 7, 129, 1000])
def test_matches_reference(n, d):
    a, b = _features(n, d, seed=n * 1000 + d)
    _assert_matches(_loss_and_grads(a, b, backend="torch"), _reference(a, b))


def test_unnormalised_features_and_auto_backend():
    # Rows of norm ~ sqrt(D) and a margin at about the median negative distance.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, 40, generator=g).requires_grad_()
    b = (a.detach() + torch.randn(200, 40, generator=g)).requires_grad_()
    got = _loss_and_grads(a, b, 11.0)  # backend="auto": torch on the CPU
    _assert_matches(got, _reference(a, b, 11.0))
    assert got[0].dtype == torch.float32


def test_gradient_to_one_side_only():
    # b without requires_grad: the backward skips dB and dA is unchanged.
    a, b = _features(50, 16)
    want_a = _reference(a, b)[1]
    a_only = a.detach().requires_grad_()
    loss = margin_contrastive_loss(a_only, b.detach(), MARGIN, backend="torch")
    (got_a,) = torch.autograd.grad(loss, a_only)
    torch.testing.assert_close(got_a, want_a, atol=1e-5 * want_a.abs().max().item(), rtol=1e-5)


def test_small_odd_tiles(monkeypatch):
    # 3 x 7 tiles: sums across row and column tiles, positives falling on tile edges.
    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 3)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 7)
    a, b = _features(100, 32)
    _assert_matches(_loss_and_grads(a, b, backend="torch"), _reference(a, b))


def test_hand_computed_two_pairs():
    # a_0 = (0, 0), b_0 = (0, 1): D_00 = 1;  a_1 = (1, 0), b_1 = (3, 0): D_11 = 2;
    # negatives: D_01 = |a_0 - b_1| = 3 (beyond m = 2), D_10 = |a_1 - b_0| = sqrt(2).
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0, 1.0], [3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    m, r2 = 2.0, math.sqrt(2)
    h10 = m - r2
    # L = (1/2)(1/2 * 1 + 1/2 * 4) + (1/2)(0 + 1/2 h10^2)
    want_loss = 1.25 + 0.25 * h10**2
    # positives: dL/da_i = (a_i - b_i) / 2; the hinge on (a_1, b_0), weight 1/(N(N-1)) = 1/2:
    # d/da_1 = -1/2 h10 (a_1 - b_0) / D_10, d/db_0 = +1/2 h10 (a_1 - b_0) / D_10.
    u = torch.tensor([1.0, -1.0], dtype=torch.float64) / r2  # (a_1 - b_0) / D_10
    want_a = torch.stack([(a[0] - b[0]) / 2, (a[1] - b[1]) / 2 - 0.5 * h10 * u]).detach()
    want_b = torch.stack([-(a[0] - b[0]) / 2 + 0.5 * h10 * u, -(a[1] - b[1]) / 2]).detach()
    for backend in ("torch", "reference"):
        loss, grad_a, grad_b = _loss_and_grads(a, b, m, backend=backend)
        torch.testing.assert_close(loss.item(), want_loss, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad_a, want_a, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad_b, want_b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    a, b = _features(300, 64, dtype=dtype)
    got = _loss_and_grads(a, b, backend="torch")
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype
    _assert_matches(got, _reference(a, b), grad_rtol=1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dist = torch.cdist(a, b).detach()
    negatives = dist[~torch.eye(6, dtype=torch.bool)].sort().values
    # The margin halfway across the widest gap between two middle negatives' distances:
    # about half the hinges active, none near a kink.
    quarter = len(negatives) // 4
    middle = negatives[quarter : 3 * quarter]
    k = int((middle[1:] - middle[:-1]).argmax())
    margin = float(middle[k] + middle[k + 1]) / 2
    gap = min((negatives - margin).abs().min().item(), negatives.min().item())
    assert gap > 1e-3  # far from both kinks at gradcheck's eps = 1e-6
    fn = lambda x, y: margin_contrastive_loss(x, y, margin, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b))


def test_negatives_beyond_the_margin_leave_only_the_positive_term():
    # Partners 0.1 apart, non-partners at least 10 apart: no hinge is active.
    n, d = 5, 8
    a = (10 * torch.eye(n, d)).requires_grad_()
    b = (a.detach() + 0.1 * torch.ones(n, d) / math.sqrt(d)).requires_grad_()
    loss, grad_a, grad_b = _loss_and_grads(a, b, 1.0, backend="torch")
    torch.testing.assert_close(loss, torch.tensor(0.5 * 0.01))
    torch.testing.assert_close(grad_a, (a - b).detach() / n)
    torch.testing.assert_close(grad_b, (b - a).detach() / n)


def test_identical_vectors_give_finite_gradients():
    # b = a, and rows 0 and 1 equal: every positive and the negatives (0, 1), (1, 0) have
    # D = 0 exactly (small integers: the expansion is exact); every other negative is at
    # least sqrt(3) > m apart. So L = 2 * (1/2 m^2) / (N(N-1)), and every gradient is 0:
    # the positives' because a_i - b_i = 0, the two hinges' by definition at D = 0.
    a = torch.tensor([[1.0, 2, 0], [1, 2, 0], [0, 1, 1], [2, 0, 1]], requires_grad=True)
    b = a.detach().clone().requires_grad_()
    m = 1.5
    for backend in ("torch", "reference"):
        loss, grad_a, grad_b = _loss_and_grads(a, b, m, backend=backend)
        torch.testing.assert_close(loss, torch.tensor(m**2 / 12))
        assert torch.equal(grad_a, torch.zeros_like(a)), grad_a
        assert torch.equal(grad_b, torch.zeros_like(b)), grad_b


def test_no_n_by_n_allocation(monkeypatch):
    """No N x N tensor, forward or backward (test_contrastive.py's probe): with N = 300 >
    D, any tensor of >= N * N / 2 elements would be quadratic; tiles are 64 x 64 here."""
    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 64)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 64)
    n = 300

    a, b = _features(n, 16)
    with largest_allocation() as largest:
        margin_contrastive_loss(a, b, MARGIN, backend="torch").backward()
    assert largest[0] < n * n // 2, largest
    with largest_allocation() as largest:  # the same probe sees the reference's distances
        margin_contrastive_loss(a, b, MARGIN, backend="reference").backward()
    assert largest[0] >= n * n


BAD_INPUTS = [
    ("not 2-D", lambda a, b: (a[0], b[0], 1.0), "2-D"),
    ("shapes differ", lambda a, b: (a, b[:-1], 1.0), "shapes differ"),
    ("dims differ", lambda a, b: (a, b[:, :-1], 1.0), "shapes differ"),
    ("empty", lambda a, b: (a[:0], b[:0], 1.0), "N == 0"),
    ("dtypes differ", lambda a, b: (a, b.double(), 1.0), "dtypes differ"),
    ("integer", lambda a, b: (a.long(), b.long(), 1.0), "float32"),
    ("margin 0", lambda a, b: (a, b, 0.0), "finite and > 0"),
    ("margin < 0", lambda a, b: (a, b, torch.tensor(-1.0)), "finite and > 0"),
    ("margin nan", lambda a, b: (a, b, float("nan")), "finite and > 0"),
    ("margin inf", lambda a, b: (a, b, math.inf), "finite and > 0"),
    ("margin vector", lambda a, b: (a, b, torch.ones(2)), "scalar"),
    ("margin string", lambda a, b: (a, b, "1"), "float or a scalar tensor"),
    ("margin grad", lambda a, b: (a, b, torch.tensor(1.0, requires_grad=True)), "require grad"),
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_value_error(case, backend):
    a, b = _features(4, 8)
    _, make, message = case
    with pytest.raises(ValueError, match=message):
        margin_contrastive_loss(*make(a.detach(), b.detach()), backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unknown_backend_raises(backend):
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, reference"):
        margin_contrastive_loss(a, b, 1.0, backend=backend)


def test_process_group_errors():
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="takes no process_group"):
        margin_contrastive_loss(a, b, 1.0, process_group=object(), backend="reference")
    with pytest.raises(ValueError, match="not initialised"):
        margin_contrastive_loss(a, b, 1.0, process_group=object(), backend="torch")
