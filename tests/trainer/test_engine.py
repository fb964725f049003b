"""The DeepSpeed configuration built from ours, the optimizer's parameter groups, the
learning-rate schedule, and hyperparameters re-applied over a loaded checkpoint."""

import math
import types

import pytest
import torch
from torch import nn

from megabatch.trainer.config import RunConfig, load_config
from megabatch.trainer.engine import (
    apply_optimizer_config,
    deepspeed_config,
    import_deepspeed,
    param_groups,
    warmup_cosine,
)


def _config(*overrides: str) -> RunConfig:
    return load_config(None, ["batch.micro_batch_size=16", "batch.accumulation_steps=4",
                              *overrides])  # fmt: skip


def test_only_matrices_decay():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model.logit_scale = nn.Parameter(torch.zeros(()))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    decay, no_decay = param_groups(model, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    # Linear bias, LayerNorm weight and bias, the scalar logit scale; nothing frozen.
    assert sorted(p.ndim for p in no_decay["params"]) == [0, 1, 1, 1]


def test_warmup_then_cosine_to_the_floor():
    factor = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    warm = [factor(s) for s in range(10)]
    assert warm == sorted(warm) and 0 < warm[0] < warm[-1] < 1
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert factor(110) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)  # past the end: stays at the floor
    decay = [factor(s) for s in range(10, 111)]
    assert decay == sorted(decay, reverse=True)


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_deepspeed_config_carries_ours(name):
    ds = deepspeed_config(_config(f"optim.name={name}", "optim.lr=0.003",
                                  "engine.zero_stage=2", "optim.grad_clip=0.5"))  # fmt: skip
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == {"adamw": "AdamW", "lamb": "Lamb", "sgd": "SGD"}[name]
    assert ds["optimizer"]["params"]["lr"] == 0.003
    assert "bf16" not in ds and "fp16" not in ds


def test_precision_and_no_clipping():
    assert deepspeed_config(_config("engine.precision=bf16"))["bf16"] == {"enabled": True}
    assert deepspeed_config(_config("engine.precision=fp16"))["fp16"]["enabled"] is True
    assert "gradient_clipping" not in deepspeed_config(_config("optim.grad_clip=null"))


def test_deepspeed_imports_without_its_cpu_shared_memory_op():
    deepspeed = import_deepspeed()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_a_resumed_run_takes_the_configs_hyperparameters():
    model = nn.Linear(4, 4)
    saved = _config("optim.lr=0.1", "optim.weight_decay=0.3", "optim.warmup_steps=0",
                    "train.max_steps=100")  # fmt: skip
    optimizer = torch.optim.AdamW(param_groups(model, 0.3), lr=0.1, betas=(0.9, 0.98))
    schedule = warmup_cosine(0, 100, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert saved.optim.lr == 0.1
    # What a checkpoint restores is the saved run's; the config says otherwise now.
    now = _config("optim.lr=0.02", "optim.weight_decay=0.05", "optim.betas=[0.8,0.9]",
                  "optim.eps=1e-8", "optim.warmup_steps=0", "train.max_steps=100")  # fmt: skip
    apply_optimizer_config(types.SimpleNamespace(optimizer=optimizer), scheduler, now)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-8
    expected = 0.02 * 0.5 * (1 + math.cos(math.pi * 0.5))  # step 50 of 100 on the new peak
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2)
    scheduler.step()
    assert decay["lr"] == pytest.approx(0.02 * schedule(51))
