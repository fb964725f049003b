"""The fused contrastive losses against the full-logits reference, on CPU.

Tolerances (fp32, CPU): the fused backends and the reference compute the same sums in a
different order (tiles, online log-sum-exp), so they agree to a few fp32 ulps of the
largest term: the loss (about log N, at most ~10 here) to 1e-5 absolute, gradients to
1e-5 of the largest reference gradient entry, with a floor of 2e-7 * s^2: a logit of
size s carries a rounding of ~1e-7 * s (S_ij and S_ji may differ by that, too), which
moves each weight W = P_row + P_col - 2 by as much, and dX sums 2N weights times s / 2N.
The floor matters where the exact gradient is 0, as for NT-Xent with N = 1. Triton runs
interpreted here, where tl.dot is IEEE fp32, so the same tolerance applies.
"""

import pytest
import torch
import torch.nn.functional as F

from megabatch.kernels import clip_loss, ntxent_loss, torch_backend
from megabatch.kernels.reference import clip_loss_reference, ntxent_loss_reference
from tests.kernels.allocations import largest_allocation
from tests.kernels.features import spread_features

NS = [1, 2, 7, 64, 129, 1000]
DS = [3, 64, 65, 256]
LOSSES = {
    # name: (loss, reference, scale or temperature used by the sweep)
    "clip": (clip_loss, clip_loss_reference, 1 / 0.07),
    "ntxent": (ntxent_loss, ntxent_loss_reference, 0.1),
}


def _features(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    # Partners correlated with a, as after some training: positives dominate the rows.
    b = F.normalize(a + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def _multiplier(loss_name, s):
    """The logit multiplier: CLIP's scale itself, NT-Xent's 1 / temperature."""
    return s if loss_name == "clip" else 1 / s


def _loss_and_grads(fn, a, b, s, **kwargs):
    s = s.detach().clone().requires_grad_()
    loss = fn(a, b, s, **kwargs)
    return (loss, *torch.autograd.grad(loss, (a, b, s)))


def _assert_matches(got, want, scale, loss_atol=1e-5, grad_rtol=1e-5):
    names = ["loss", "grad a", "grad b", "grad scale"]
    floor = 2e-7 * scale**2
    for name, g, w in zip(names, got, want, strict=True):
        assert torch.isfinite(g).all(), name
        atol = loss_atol if name == "loss" else max(grad_rtol * w.abs().max().item(), floor)
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=grad_rtol, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_matches_reference(n, d, loss_name, backend):
    fn, ref, s = LOSSES[loss_name]
    a, b = _features(n, d, seed=n * 1000 + d)
    scale = torch.tensor(s)
    got = _loss_and_grads(fn, a, b, scale, backend=backend)
    want = _loss_and_grads(ref, a, b, scale)
    _assert_matches(got, want, _multiplier(loss_name, s))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_scale_100_does_not_overflow(loss_name, backend):
    # Identical features: every positive logit is exactly 100 (CLIP's clamp), the largest
    # value a normalised batch can produce.
    fn, ref, _ = LOSSES[loss_name]
    a, _ = _features(129, 64)
    b = a.detach().clone().requires_grad_()
    scale = torch.tensor(100.0) if loss_name == "clip" else torch.tensor(0.01)
    got = _loss_and_grads(fn, a, b, scale, backend=backend)
    want = _loss_and_grads(ref, a, b, scale)
    _assert_matches(got, want, 100.0, loss_atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton one exp2", "triton two exp2s"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_logits_spread_past_one_shared_shift(loss_name, backend, monkeypatch):
    # The forward's column sums reuse the rows' exponentials, one shift per tile (torch
    # backend, Triton's ONE_EXP configs), and fall back to each column's own max in a
    # tile where a column's terms would underflow. 32 x 64 tiles over N = 100: the tiles
    # of columns 0-63 take the shared path, those of columns 64-99 (near and far
    # together) the fallback. Triton without ONE_EXP takes two exponentials everywhere.
    from megabatch.kernels.triton_backend import common, forward

    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 32)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 64)
    monkeypatch.setattr(common, "INTERPRET_BLOCKS", {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128})
    monkeypatch.setattr(forward, "_INTERPRET_ONE_EXP", backend != "triton two exp2s")
    backend = backend.split()[0]
    fn, ref, _ = LOSSES[loss_name]
    a, b = spread_features(100, 16, far_from=80)
    scale = torch.tensor(100.0) if loss_name == "clip" else torch.tensor(0.01)
    got = _loss_and_grads(fn, a, b, scale, backend=backend)
    want = _loss_and_grads(ref, a, b, scale)
    _assert_matches(got, want, 100.0, loss_atol=1e-4)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_torch_backend_small_odd_tiles(loss_name, monkeypatch):
    # 3 x 7 tiles: every merge across row and column tiles, and positives and NT-Xent's
    # self entries falling on tile edges (one 1024 x 1024 tile holds these whole batches).
    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 3)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 7)
    fn, ref, s = LOSSES[loss_name]
    a, b = _features(100, 32)
    got = _loss_and_grads(fn, a, b, torch.tensor(s), backend="torch")
    want = _loss_and_grads(ref, a, b, torch.tensor(s))
    _assert_matches(got, want, _multiplier(loss_name, s))


@pytest.mark.parametrize("one_exp", [True, False])
@pytest.mark.parametrize("block_k", ["whole rows", 16])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_triton_both_loading_schemes(loss_name, block_k, one_exp, monkeypatch):
    # The sweep above runs whole rows for D <= 128 and K-chunks for D = 256 (interpreter
    # BLOCK_K = 128); here each scheme runs where the sweep runs the other, with row and
    # column blocks that split N = 100 into ragged tiles; and with one exp2 a logit (as
    # the sweep) and two (the other autotune configs).
    from megabatch.kernels.triton_backend import common, forward

    monkeypatch.setattr(forward, "_INTERPRET_ONE_EXP", one_exp)
    blocks = {"BLOCK_M": 32, "BLOCK_N": 64}
    blocks["BLOCK_K"] = common.WHOLE_ROWS if block_k == "whole rows" else block_k
    monkeypatch.setattr(common, "INTERPRET_BLOCKS", blocks)
    d = 256 if block_k == "whole rows" else 40
    fn, ref, s = LOSSES[loss_name]
    a, b = _features(100, d, seed=7)
    got = _loss_and_grads(fn, a, b, torch.tensor(s), backend="triton")
    want = _loss_and_grads(ref, a, b, torch.tensor(s))
    _assert_matches(got, want, _multiplier(loss_name, s))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_triton_backward_with_dx_columns_split(loss_name, monkeypatch):
    # DX_SPLIT = 2: two programs share each row block's dX columns (D = 200: the second
    # half is ragged), each recomputing S from K-chunks.
    from megabatch.kernels.triton_backend import common

    monkeypatch.setattr(common, "INTERPRET_BLOCKS", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
    monkeypatch.setattr(common, "INTERPRET_DX_SPLIT", 2)
    fn, ref, s = LOSSES[loss_name]
    a, b = _features(100, 200, seed=11)
    got = _loss_and_grads(fn, a, b, torch.tensor(s), backend="triton")
    want = _loss_and_grads(ref, a, b, torch.tensor(s))
    _assert_matches(got, want, _multiplier(loss_name, s))


@pytest.mark.parametrize("dx_split", [1, 2])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_triton_tma_backward(loss_name, dx_split, monkeypatch):
    # The experimental TMA kernel (MEGABATCH_TRITON_WS=1): D = 48 pads to 64 columns and
    # N = 100 leaves ragged 32 x 64 tiles, so the descriptors' zero fill past N and past
    # D is what keeps the sums right. D = 46 (184-byte rows) is no TMA stride: it falls
    # back to the plain kernel, with the same result.
    from megabatch.kernels.triton_backend import backward_tma, common

    monkeypatch.setenv(backward_tma.TMA_BACKWARD_ENV, "1")
    # BLOCK_K: the fallback's K-chunks (the TMA kernel always loads whole rows).
    monkeypatch.setattr(common, "INTERPRET_BLOCKS", {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32})
    monkeypatch.setattr(common, "INTERPRET_DX_SPLIT", dx_split)
    used = []
    real = backward_tma.row_gradient_tma
    monkeypatch.setattr(
        backward_tma, "row_gradient_tma", lambda *a, **k: used.append(1) or real(*a, **k)
    )
    fn, ref, s = LOSSES[loss_name]
    for d, tma in ((48, True), (46, False)):
        used.clear()
        a, b = _features(100, d, seed=13)
        got = _loss_and_grads(fn, a, b, torch.tensor(s), backend="triton")
        want = _loss_and_grads(ref, a, b, torch.tensor(s))
        _assert_matches(got, want, _multiplier(loss_name, s))
        assert bool(used) == tma


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_half_precision_inputs_torch_backend(loss_name, dtype):
    # Both sides read the same rounded inputs and accumulate in fp32, so the loss agrees
    # to fp32 accuracy; gradients come back in the input dtype, one rounding of 2^-8
    # (bf16) or 2^-11 (fp16) relative, hence rtol 1e-2 / 2e-3.
    fn, ref, s = LOSSES[loss_name]
    a, b = _features(300, 64, dtype=dtype)
    got = _loss_and_grads(fn, a, b, torch.tensor(s), backend="torch")
    want = _loss_and_grads(ref, a, b, torch.tensor(s))
    assert got[0].dtype == torch.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    _assert_matches(got, want, _multiplier(loss_name, s), grad_rtol=rtol)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_gradcheck_float64_torch_backend(loss_name):
    fn, _, s = LOSSES[loss_name]
    a, b = _features(6, 5, dtype=torch.float64)
    scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, t: fn(x, y, t, backend="torch"), (a, b, scale))


def test_temperature_gradient_flows_through_float_and_tensor():
    a, b = _features(16, 8)
    loss_float = ntxent_loss(a, b, 0.5, backend="torch")
    tau = torch.tensor(0.5, requires_grad=True)
    loss_tensor = ntxent_loss(a, b, tau, backend="torch")
    torch.testing.assert_close(loss_float, loss_tensor)
    (grad_tau,) = torch.autograd.grad(loss_tensor, tau)
    tau_ref = torch.tensor(0.5, requires_grad=True)
    (want,) = torch.autograd.grad(ntxent_loss_reference(a, b, tau_ref), tau_ref)
    torch.testing.assert_close(grad_tau, want)


def test_loss_is_permutation_invariant_and_matches_formula():
    # Independent of the reference: CLIP's loss for orthonormal pairs (S = s I) is
    # log(1 + (N - 1) exp(-s)) in both directions.
    n, s = 8, 5.0
    eye = torch.eye(n)
    loss = clip_loss(eye, eye, torch.tensor(s), backend="torch")
    expected = torch.log1p(torch.tensor((n - 1) * torch.exp(torch.tensor(-s)).item()))
    torch.testing.assert_close(loss, expected)
    perm = torch.randperm(n)
    torch.testing.assert_close(clip_loss(eye[perm], eye[perm], torch.tensor(s)), loss)


BAD_INPUTS = [
    ("not 2-D", lambda a, b: (a[0], b[0], 10.0), "2-D"),
    ("shapes differ", lambda a, b: (a, b[:-1], 10.0), "shapes differ"),
    ("dims differ", lambda a, b: (a, b[:, :-1], 10.0), "shapes differ"),
    ("empty", lambda a, b: (a[:0], b[:0], 10.0), "N == 0"),
    ("dtypes differ", lambda a, b: (a, b.double(), 10.0), "dtypes differ"),
    ("integer", lambda a, b: (a.long(), b.long(), 10.0), "float32"),
    ("nan scale", lambda a, b: (a, b, float("nan")), "finite"),
    ("inf scale", lambda a, b: (a, b, torch.tensor(float("inf"))), "finite"),
    ("vector scale", lambda a, b: (a, b, torch.ones(2)), "scalar"),
]


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_value_error(loss_name, case):
    fn = LOSSES[loss_name][0]
    a, b = _features(4, 8)
    _, make, message = case
    with pytest.raises(ValueError, match=message):
        fn(*make(a.detach(), b.detach()), backend="torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_devices_differ_raises():
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="different devices"):
        clip_loss(a, b.cuda(), 10.0)


@pytest.mark.parametrize("temperature", [0.0, -0.1, torch.tensor(-1.0)])
def test_non_positive_temperature_raises(temperature):
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ntxent_loss(a, b, temperature)


def test_unknown_backend_raises():
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        clip_loss(a, b, 10.0, backend="cuda")


def test_triton_backend_rejects_float64():
    a, b = _features(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        clip_loss(a, b, 10.0, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_n_by_n_allocation(backend, monkeypatch):
    """The fused backends never allocate an N x N tensor, forward or backward.

    Every tensor allocated through the torch dispatcher is inspected
    (allocations.largest_allocation); with N = 300 > D any tensor with >= N * N / 2
    elements would be quadratic. The torch backend's tiles are made smaller than that here.
    """
    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 64)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 64)
    n = 300

    for fn, _, s in LOSSES.values():
        a, b = _features(n, 16)
        with largest_allocation() as largest:
            fn(a, b, torch.tensor(s), backend=backend).backward()
        assert largest[0] < n * n // 2, largest
    # The same probe sees the reference's quadratic logits, so it does measure something.
    a, b = _features(n, 16)
    with largest_allocation() as largest:
        clip_loss(a, b, 10.0, backend="reference").backward()
    assert largest[0] >= n * n


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ntxent_views_of_one_tensor_are_not_copied(backend):
    """z1 and z2 as the two halves of one (2N, D) tensor (the trainer's layout): [z1; z2]
    is a view, no aten.cat copy in the forward, and loss and gradients equal those of two
    separate tensors; z2 before z1 in memory is copied, and still right."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.called = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.called.add(func)
            return func(*args, **(kwargs or {}))

    n, d, temperature = 50, 16, torch.tensor(0.1)
    a, b = _features(n, d)
    want = _loss_and_grads(ntxent_loss, a, b, temperature, backend=backend)
    for order, copied in ((lambda a, b: (a, b), False), (lambda a, b: (b, a), True)):
        first, second = order(a.detach(), b.detach())
        both = torch.cat([first, second])
        z1, z2 = order(*both.split(n))
        z1.requires_grad_(), z2.requires_grad_()
        ops = Ops()
        with ops:
            loss = ntxent_loss(z1, z2, temperature, backend=backend)
        assert (torch.ops.aten.cat.default in ops.called) == copied
        got = (loss, *torch.autograd.grad(loss, (z1, z2)))
        for g, w in zip(got, want[:3], strict=True):
            torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_torch_backend_forward_copies_no_features(loss_name, monkeypatch):
    """fp32 features in the trainer's layout: the torch backend's forward allocates tiles
    and O(N) statistics, nothing of the features' size (N x D; no scaled copy of the rows,
    no [z1; z2])."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(torch_backend, "_TILE_ROWS", 32)
    monkeypatch.setattr(torch_backend, "_TILE_COLS", 32)
    n, d = 100, 64
    largest = 0

    class LargestAllocation(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            if func not in (torch.ops.aten.as_strided.default, torch.ops.aten.t.default):
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and not t._is_view():
                        largest = max(largest, t.numel())
            return out

    fn, _, s = LOSSES[loss_name]
    a, b = _features(n, d)
    z1, z2 = torch.cat([a, b]).detach().split(n)
    with LargestAllocation():
        fn(z1, z2, torch.tensor(s), backend="torch")
    assert 0 < largest < n * d, largest


def test_ntxent_view_sees_in_place_changes_before_backward():
    both = F.normalize(torch.randn(8, 4), dim=1)
    z1, z2 = both.split(4)
    z1.requires_grad_(), z2.requires_grad_()
    loss = ntxent_loss(z1, z2, 0.5, backend="torch")
    with torch.no_grad():
        z2.mul_(2)  # the saved [z1; z2] would be stale
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_process_group_errors():
    a, b = _features(4, 8)
    with pytest.raises(ValueError, match="takes no process_group"):
        clip_loss(a, b, 10.0, process_group=object(), backend="reference")
    with pytest.raises(ValueError, match="not initialised"):
        ntxent_loss(a, b, 0.1, process_group=object(), backend="torch")
