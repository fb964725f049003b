"""MoCo v3 and BYOL without a run: the cosine momentum schedule, the EMA target (float32,
the paper's update, its own state), their losses against plain formulas, and the tasks'
contract (targets without grad, the update after a step, state in and out).

Tolerances: float32 arithmetic on values of order 1: 1e-6 (a few roundings); the EMA's
reference is computed in float64 and compared at 1e-7 absolute (one float32 rounding of
weights of order 0.1)."""

import math

import pytest
import torch

from megabatch.trainer.config import load_config
from megabatch.trainer.losses import byol_loss, moco_loss
from megabatch.trainer.methods.momentum import MomentumTarget, cosine_momentum
from megabatch.trainer.tasks import make_task


def test_the_momentum_rises_from_its_base_to_one_on_a_cosine():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 150, 100) == pytest.approx(1.0)  # past the end: stays
    ms = [cosine_momentum(0.996, t, 40) for t in range(41)]
    assert all(a <= b for a, b in zip(ms, ms[1:], strict=False))


def test_the_target_follows_the_online_weights_by_ema_in_float32():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    target = MomentumTarget(online, torch.device("cpu"))
    start = {k: v.double() for k, v in target.network.state_dict().items()}
    assert not any(p.requires_grad for p in target.network.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online_bf16 = online.to(torch.bfloat16)  # a bf16 run's module: read in float32
    target.update(online_bf16, 0.9)
    for name, p in online_bf16.named_parameters():
        want = 0.9 * start[name] + 0.1 * p.double()
        got = dict(target.network.named_parameters())[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-7, rtol=0)
    # Buffers are the target's own: the running statistics did not move with the update.
    torch.testing.assert_close(target.network[1].running_mean.double(), start["1.running_mean"])

    copy = MomentumTarget(online.float(), torch.device("cpu"))
    copy.load_state_dict(target.state_dict())
    for a, b in zip(copy.network.state_dict().values(), target.network.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def _ctr(q, k, tau):
    """InfoNCE in both directions, averaged (clip_loss's definition), from the logits."""
    logits = q @ k.T / tau
    labels = torch.arange(len(q))
    ce = torch.nn.functional.cross_entropy
    return (ce(logits, labels) + ce(logits.T, labels)) / 2


def test_moco_loss_is_the_symmetrised_infonce_times_two_tau():
    f = {name: _unit(12, 8, seed=i) for i, name in enumerate(("p1", "p2", "z1", "z2"))}
    tau = 0.2
    want = 2 * tau * (_ctr(f["p1"], f["z2"], tau) + _ctr(f["p2"], f["z1"], tau))
    torch.testing.assert_close(moco_loss(f, tau, backend="torch"), want, atol=1e-6, rtol=1e-6)


def test_byol_loss_is_the_normalised_mse_of_each_prediction_to_the_other_target():
    f = {name: _unit(12, 8, seed=i) for i, name in enumerate(("p1", "p2", "z1", "z2"))}
    mse = torch.nn.functional.mse_loss
    want = (mse(f["p1"], f["z2"], reduction="none").sum(-1).mean()
            + mse(f["p2"], f["z1"], reduction="none").sum(-1).mean())  # fmt: skip
    torch.testing.assert_close(byol_loss(f), want, atol=1e-6, rtol=1e-6)
    perfect = {"p1": f["p1"], "p2": f["p2"], "z1": f["p2"], "z2": f["p1"]}
    assert abs(byol_loss(perfect).item()) <= 1e-6  # predictions on target: zero


@pytest.fixture(scope="module")
def _process_group():
    """The tasks' augmentation seeds name the rank: a one-rank gloo group."""
    import torch.distributed as dist

    from tests.multiproc import _free_port

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)  # fmt: skip
    yield
    dist.destroy_process_group()  # the tests after this one in the worker expect none


class _Batch:
    def __init__(self, images):
        self.images = images

    def to(self, device):
        return self


@pytest.mark.parametrize("task_name, momentum, step_kind", [("moco", 0.99, "gradcache"),
                                                            ("byol", 0.996, "accumulate")])  # fmt: skip
def test_momentum_tasks_targets_update_and_state(_process_group, task_name, momentum, step_kind):
    config = load_config(None, [f"task={task_name}", "model.preset=tiny-resnet",
                                "model.image_size=16", "model.embed_dim=8",
                                "model.hidden_dim=16", "train.max_steps=10"])  # fmt: skip
    task = make_task(config, torch.device("cpu"), 1, None)
    assert task.step_kind == step_kind and task.momentum == momentum
    torch.manual_seed(0)
    model = task.build_model()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    micro = task.inputs(_Batch(images), step=3, index=1)
    assert all(torch.equal(a, b) for a, b in zip(micro, task.inputs(_Batch(images), 3, 1),
                                                  strict=True))  # fmt: skip
    online = task.encode(model, micro)
    fixed = task.targets(micro)
    assert set(online) == {"p1", "p2"} and set(fixed) == {"z1", "z2"}
    assert online["p1"].requires_grad and not fixed["z1"].requires_grad
    assert all(torch.allclose(v.norm(dim=-1), torch.ones(6)) for v in [*online.values(),
                                                                        *fixed.values()])  # fmt: skip
    loss = task.loss({**online, **fixed}, {})
    assert loss.ndim == 0 and math.isfinite(loss.item())

    # After a step the target moves by (1 - m(t)) of the way to the online weights.
    start = {k: v.clone() for k, v in task.state_dict()["target"].items()}
    with torch.no_grad():
        model.encoder.embedder.embedder.convolution.weight.add_(1.0)
    task.after_optimizer_step(model, step=5)
    m = cosine_momentum(momentum, 5, 10)
    key = "encoder.embedder.embedder.convolution.weight"
    moved = task.state_dict()["target"][key] - start[key]
    torch.testing.assert_close(moved, torch.full_like(moved, 1 - m), atol=1e-6, rtol=0)
    assert not any(k.startswith("predictor.") for k in start)  # the target has none

    other = make_task(config, torch.device("cpu"), 1, None)
    other.build_model()
    other.load_state_dict(task.state_dict())
    assert all(torch.equal(a, other.state_dict()["target"][k])
               for k, a in task.state_dict()["target"].items())  # fmt: skip
    with pytest.raises(ValueError, match=f"no target network for task {task_name}"):
        other.load_state_dict({})
