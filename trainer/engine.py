"""The DeepSpeed engine, configured from ours: ZeRO stage, precision, clipping, the
optimizer with decay only where it belongs, and linear warm-up then cosine decay.

Gradient accumulation is done by the contrastive step (trainer.step, the GradCache
method), which calls ``engine.backward`` once per micro-batch and ``engine.step`` after
each; DeepSpeed steps the optimizer on the last, so its gradient_accumulation_steps is
ours. DeepSpeed is imported here only, never by models or kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from megabatch.trainer.config import RunConfig


def decays(param: torch.Tensor) -> bool:
    """Decay matrices only: no decay on biases, norms' gains or the logit scale (all of
    them tensors of fewer than 2 dimensions), as in CLIP."""
    return param.ndim >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The optimizer's two groups, [decay, no decay] (``decays``), each in the model's
    parameter order (checkpoint.whole_master_weights reads them back by this order)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(param) else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear from 0 over warm-up, then
    cosine down to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(config: RunConfig) -> dict:
    o = config.optim
    if o.name == "adamw":
        optimizer = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                 "weight_decay": o.weight_decay, "torch_adam": True}}  # fmt: skip
    elif o.name == "lamb":
        optimizer = {"type": "Lamb", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                "weight_decay": o.weight_decay}}  # fmt: skip
    else:
        optimizer = {"type": "SGD", "params": {"lr": o.lr, "momentum": o.momentum,
                                               "weight_decay": o.weight_decay}}  # fmt: skip
    ds = {
        "train_micro_batch_size_per_gpu": config.batch.micro_batch_size,
        "gradient_accumulation_steps": config.batch.accumulation_steps,
        "optimizer": optimizer,
        "zero_optimization": {"stage": config.engine.zero_stage},
        # torch's AdamW and SGD are not on DeepSpeed's list of ZeRO-tested optimizers,
        # but ZeRO only partitions their state; DeepSpeed's fused ones need CUDA.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logging
        "wall_clock_breakdown": False,
    }
    if o.grad_clip is not None:
        ds["gradient_clipping"] = o.grad_clip
    if config.engine.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif config.engine.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def import_deepspeed():
    """``import deepspeed``, without the CPU op it would JIT-build at every start.

    DeepSpeed's CPU accelerator builds a shared-memory all-reduce op
    (``deepspeed_shm_comm``) when its communication backend starts, under a lock file in
    the torch extensions cache: a start killed during that build leaves the lock behind
    and every later start on the machine waits on it for ever, silently. The op serves only
    DeepSpeed's inference all-reduce, which training never calls; marked incompatible, it
    is not built, and that all-reduce falls back to torch.distributed's. DeepSpeed keeps
    this table in its module so that edits to it persist (deepspeed/ops/__init__.py)."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def build_engine(model: nn.Module, config: RunConfig):
    """(engine, scheduler). The process group must exist (megabatch.trainer.launch)."""
    deepspeed = import_deepspeed()

    schedule = warmup_cosine(
        config.optim.warmup_steps, config.train.max_steps, config.optim.min_lr_ratio
    )
    # A callable: DeepSpeed builds it on the optimizer it made (ZeRO's wrapper is no
    # torch Optimizer) and steps it at each accumulation boundary.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, config.optim.weight_decay),
        config=deepspeed_config(config),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine, scheduler


def apply_optimizer_config(engine, scheduler, config: RunConfig) -> None:
    """After a checkpoint is loaded: the config's hyperparameters over the checkpoint's.

    A checkpoint restores the optimizer's moments and the scheduler's step, but also the
    learning rate, betas, eps and weight decay it was saved with (they live in the
    optimizer's param_groups and the scheduler's base_lrs). The resume rules
    (trainer.resume) let these change on resume, and a change must take effect: set them
    again from the config, and the learning rate from the config's schedule at the
    resumed step (the schedule function is always the config's: LambdaLR does not save
    plain functions)."""
    o = config.optim
    groups = engine.optimizer.param_groups  # [decay, no decay]: param_groups' order
    for group in groups:
        if o.name in ("adamw", "lamb"):
            group["betas"], group["eps"] = tuple(o.betas), o.eps
        else:
            group["momentum"] = o.momentum
    groups[0]["weight_decay"] = o.weight_decay
    scheduler.base_lrs = [o.lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * factor(scheduler.last_epoch)
