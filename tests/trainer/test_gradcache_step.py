"""GradCache accumulation keeps every sample a negative: 4 micro-batches of 64 give the
same parameter update as one batch of 256 (and 2 ranks x 2 x 64 the same again).

DeepSpeed on CPU ranks (gloo), plain SGD without momentum so that the update is the
gradient itself (Adam's first step is scale-free and would hide a scaling mistake).
Tolerance: fp32, the same sums in different orders over 256 samples: 1e-5 of the
largest update entry, plus one rounding of the parameter itself (1.2e-7 of its largest
entry: the update is read back as after - before), plus 1e-7 of the largest update in
the whole model, for gradients that are zero in exact arithmetic (attention key biases)
and come out as fp32 noise from the other gradients' sums.
"""

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import run_ranks

N = 256


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 16, 16, generator=g)
    tokens = torch.randint(3, 100, (N, 8), generator=g)
    tokens[:, 0] = 2  # start
    ends = torch.randint(3, 8, (N,), generator=g)
    tokens[torch.arange(N), ends] = 1  # end token
    mask = torch.ones(N, 8, dtype=torch.bool)
    return images, tokens, mask


def _train_one_step(rank, world_size, micro, zero_stage):
    from megabatch.kernels import clip_loss
    from megabatch.trainer.config import load_config
    from megabatch.trainer.engine import build_engine
    from megabatch.trainer.models.clip import ClipModel, clip_config
    from megabatch.trainer.step import gradcache_step

    accumulation = N // (micro * world_size)
    config = load_config(None, [
        f"batch.micro_batch_size={micro}", f"batch.accumulation_steps={accumulation}",
        "optim.name=sgd", "optim.momentum=0.0", "optim.lr=0.5", "optim.weight_decay=0.0",
        "optim.warmup_steps=0", "optim.grad_clip=null", f"engine.zero_stage={zero_stage}",
    ])  # fmt: skip
    torch.manual_seed(0)
    model = ClipModel(clip_config("tiny", image_size=16, context_length=8, vocab_size=100,
                                  pad_id=0, sot_id=2, eot_id=1))  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _ = build_engine(model, config)

    images, tokens, mask = _batch()
    rows = torch.arange(N).view(world_size, accumulation, micro)[rank]  # this rank's rows
    micro_batches = [(images[r], tokens[r], mask[r]) for r in rows]

    def encode(m, b):
        return {"image": m.encode_image(b[0]), "text": m.encode_text(b[1], b[2])}

    def loss_fn(f, p):
        return clip_loss(f["image"], f["text"], p["logit_scale"], process_group=dist.group.WORLD,
                         backend="torch")  # fmt: skip

    result = gradcache_step(engine, micro_batches, encode, loss_fn,
                            lambda m: {"logit_scale": m.logit_scale()}, world_size)  # fmt: skip
    after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return result.loss, {n: (after[n] - before[n], before[n].abs().max()) for n in before}


@pytest.mark.multiproc
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_accumulation_gives_the_update_of_one_big_batch(zero_stage):
    ((loss_big, update_big),) = run_ranks(_train_one_step, 1, 256, zero_stage, timeout_s=110)
    ((loss_acc, update_acc),) = run_ranks(_train_one_step, 1, 64, zero_stage, timeout_s=110)
    ranks = run_ranks(_train_one_step, 2, 64, zero_stage, timeout_s=110)
    torch.testing.assert_close(loss_acc, loss_big, atol=1e-5, rtol=1e-5)
    assert update_big["log_logit_scale"][0].abs() > 0  # the scale is trained too
    model_max = max(update.abs().max().item() for update, _ in update_big.values())
    for name, (want, param_max) in update_big.items():
        atol = 1e-5 * want.abs().max().item() + 1.2e-7 * param_max.item() + 1e-7 * model_max
        torch.testing.assert_close(update_acc[name][0], want, atol=atol, rtol=1e-4, msg=name)
        for loss, update in ranks:
            torch.testing.assert_close(update[name][0], want, atol=atol, rtol=1e-4, msg=name)
            torch.testing.assert_close(loss, loss_big, atol=1e-5, rtol=1e-5)


class _AutogradEngine:
    """The three members of a DeepSpeed engine that gradcache_step uses, over plain
    autograd: enough to see what the step hands the loss."""

    def __init__(self, module):
        self.module = module

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def test_both_feature_sides_reach_the_loss_as_halves_of_one_buffer():
    """NT-Xent then stacks [a; b] without a copy (kernels.contrastive._stacked)."""
    from megabatch.kernels import ntxent_loss
    from megabatch.trainer.step import gradcache_step

    torch.manual_seed(0)
    projector = torch.nn.Linear(6, 4)
    micro_batches = [torch.randn(5, 6), torch.randn(5, 6)]
    seen = {}

    def encode(model, x):
        z = torch.nn.functional.normalize(model(x), dim=1)
        return {"view1": z, "view2": torch.nn.functional.normalize(model(x.flip(1)), dim=1)}

    def loss_fn(f, params):
        seen["gap"] = f["view2"].data_ptr() - f["view1"].data_ptr()
        return ntxent_loss(f["view1"], f["view2"], 0.5, backend="torch")

    result = gradcache_step(_AutogradEngine(projector), micro_batches, encode, loss_fn,
                            lambda m: {}, 1)  # fmt: skip
    assert seen["gap"] == 10 * 4 * 4  # b's first row directly after a's last (10 x 4 fp32)
    assert torch.isfinite(result.loss) and projector.weight.grad.abs().sum() > 0
