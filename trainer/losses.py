"""The contrastive loss a run trains with, chosen by ``loss.name`` and handed to the task
(``make_loss``): a function of the task's two named feature sets (this rank's rows of
the global batch, in the task's order: CLIP's image then text, SimCLR's two views) and
of the learnt loss parameters (``loss_params``: CLIP's logit scale), which calls the
fused kernel over the run's process group with the run's loss backend. This module is
the one place that knows which loss takes which parameters and fits which task."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megabatch.kernels import clip_loss, margin_contrastive_loss, ntxent_loss, siglip_loss
from megabatch.trainer.config import ConfigError, RunConfig

LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    tasks: tuple[str, ...]  # the tasks whose features it takes
    # The learnt loss parameters it takes, by name (models hold them), and their initial
    # values where the config leaves them unset (loss.init_logit_scale, init_logit_bias).
    params: dict[str, float]
    # (a (M, D), b (M, D), params, config, process_group, backend) -> the global loss
    call: Callable[..., torch.Tensor]
    # What the logs call its scale when it learns none: NT-Xent's 1 / temperature; None
    # for a loss without logits (the margin loss: logged as NaN).
    fixed_scale: Callable[[RunConfig], float] | None = None


LOSSES: dict[str, LossSpec] = {
    # CLIP's symmetric InfoNCE: softmax over the global batch, both directions; the
    # paper's temperature 0.07 at the start.
    "infonce": LossSpec(("clip",), {"logit_scale": 1 / 0.07},
                        lambda a, b, p, config, **run: clip_loss(a, b, p["logit_scale"], **run)),
    # SigLIP: a sigmoid per pair, no softmax over the batch; t = 10, b = -10 at the start
    # (Zhai et al. 2023: log t = log 10, b = -10, against the N^2 - N negatives' weight).
    "siglip": LossSpec(("clip",), {"logit_scale": 10.0, "logit_bias": -10.0},
                       lambda a, b, p, config, **run: siglip_loss(
                           a, b, p["logit_scale"], p["logit_bias"], **run)),
    # SimCLR's NT-Xent: both views as anchors, 2N - 2 negatives each, fixed temperature.
    "ntxent": LossSpec(("simclr",), {}, lambda a, b, p, config, **run: ntxent_loss(
        a, b, config.loss.temperature, **run), lambda config: 1 / config.loss.temperature),
    # Hadsell et al.'s margin loss on Euclidean distances: the mean positive pull plus the
    # mean hinge on the N^2 - N negatives, margin loss.margin. SimCLR's views only: CLIP's
    # model holds a logit scale that this loss would leave untrained.
    "margin": LossSpec(("simclr",), {}, lambda a, b, p, config, **run:
                       margin_contrastive_loss(a, b, config.loss.margin, **run)),
}  # fmt: skip
# What ``loss.name: null`` (the default) trains each task with.
TASK_LOSS = {"clip": "infonce", "simclr": "ntxent"}


def loss_name(config: RunConfig) -> str:
    return config.loss.name or TASK_LOSS[config.task]


def check_loss(config: RunConfig) -> None:
    """ConfigError (one line) unless ``loss.name`` names a loss that fits the task and
    the initial logit scale is within its clamp."""
    name = loss_name(config)
    fitting = sorted(n for n, spec in LOSSES.items() if config.task in spec.tasks)
    if name not in LOSSES or config.task not in LOSSES[name].tasks:
        raise ConfigError(f"loss.name {name!r} does not fit task {config.task} "
                          f"(choose from {', '.join(fitting)})")  # fmt: skip
    scale = initial_loss_params(config).get("logit_scale")
    if scale is not None and scale > config.loss.max_logit_scale:
        raise ConfigError(f"loss {name}'s initial logit scale {scale:g} is above "
                          f"loss.max_logit_scale {config.loss.max_logit_scale:g}")  # fmt: skip


def initial_loss_params(config: RunConfig) -> dict[str, float]:
    """The learnt loss parameters the run's loss takes, with their values at step 0: the
    config's (loss.init_logit_scale, loss.init_logit_bias) where set, else the loss's."""
    given = {"logit_scale": config.loss.init_logit_scale,
             "logit_bias": config.loss.init_logit_bias}  # fmt: skip
    spec = LOSSES[loss_name(config)]
    return {k: given[k] if given[k] is not None else v for k, v in spec.params.items()}


def logged_scale(config: RunConfig, params: dict[str, torch.Tensor]) -> float:
    """The ``logit_scale`` of the logs and metrics: the learnt one, else the loss's fixed
    one, else NaN (host sync: call on logging steps only)."""
    if "logit_scale" in params:
        return params["logit_scale"].item()
    fixed = LOSSES[loss_name(config)].fixed_scale
    return fixed(config) if fixed is not None else math.nan


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
