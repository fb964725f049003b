"""The contrastive loss a run trains with, chosen by ``loss.name`` and handed to the task
(``make_loss``): a function of the task's two named feature sets (this rank's rows of
the global batch, in the task's order: CLIP's image then text, SimCLR's two views) and
of the learnt loss parameters (``loss_params``: CLIP's logit scale), which calls the
fused kernel over the run's process group with the run's loss backend. This module is
the one place that knows which loss takes which parameters and fits which task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megabatch.kernels import clip_loss, ntxent_loss
from megabatch.trainer.config import ConfigError, RunConfig

LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    tasks: tuple[str, ...]  # the tasks whose features it takes
    params: tuple[str, ...]  # the learnt loss parameters it takes, by name (models hold them)
    # (a (M, D), b (M, D), params, config, process_group, backend) -> the global loss
    call: Callable[..., torch.Tensor]


LOSSES: dict[str, LossSpec] = {
    # CLIP's symmetric InfoNCE: softmax over the global batch, both directions.
    "infonce": LossSpec(("clip",), ("logit_scale",), lambda a, b, p, config, **run: clip_loss(
        a, b, p["logit_scale"], **run)),
    # SimCLR's NT-Xent: both views as anchors, 2N - 2 negatives each, fixed temperature.
    "ntxent": LossSpec(("simclr",), (), lambda a, b, p, config, **run: ntxent_loss(
        a, b, config.loss.temperature, **run)),
}  # fmt: skip
# What ``loss.name: null`` (the default) trains each task with.
TASK_LOSS = {"clip": "infonce", "simclr": "ntxent"}


def loss_name(config: RunConfig) -> str:
    return config.loss.name or TASK_LOSS[config.task]


def check_loss(config: RunConfig) -> None:
    """ConfigError (one line) unless ``loss.name`` names a loss that fits the task."""
    name = loss_name(config)
    fitting = sorted(n for n, spec in LOSSES.items() if config.task in spec.tasks)
    if name not in LOSSES or config.task not in LOSSES[name].tasks:
        raise ConfigError(f"loss.name {name!r} does not fit task {config.task} "
                          f"(choose from {', '.join(fitting)})")  # fmt: skip


def make_loss(config: RunConfig, world_size: int) -> LossFn:
    """features ({name: (M, D)}, two of them), params ({name: 0-dim}) -> the loss over the
    global batch (every rank's rows: the kernels gather the others')."""
    spec = LOSSES[loss_name(config)]
    group = dist.group.WORLD if world_size > 1 else None

    def loss(features: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = features.values()
        return spec.call(a, b, params, config, process_group=group,
                         backend=config.engine.loss_backend)  # fmt: skip

    return loss
