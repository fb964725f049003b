"""The loss a run trains with, chosen by ``loss.name`` and handed to the task
(``make_loss``): a function of the task's named features (this rank's rows: CLIP's
image and text, SimCLR's two views, MoCo's and BYOL's predictions and target
projections, a pretext task's logits and labels) and of the learnt loss parameters
(``loss_params``: CLIP's logit scale, SigLIP's bias), which calls the fused kernel over
the run's process group with the run's loss backend where the loss has one. This module
is the one place that knows which loss takes which parameters and fits which task."""

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
    # (features {name: (M, D)}, params, config, process_group, backend) -> the loss
    call: Callable[..., torch.Tensor]
    # What the logs call its scale when it learns none: NT-Xent's 1 / temperature; None
    # for a loss without logits (the margin loss, BYOL's: logged as NaN).
    fixed_scale: Callable[[RunConfig], float] | None = None


def _pair(features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A pairwise loss's two feature sets, in the task's order (image then text; the two
    views)."""
    a, b = features.values()
    return a, b


def moco_loss(features, temperature: float, **run) -> torch.Tensor:
    """MoCo v3's symmetrised loss, 2 tau [ctr(p1, z2) + ctr(p2, z1)]: each view's online
    prediction against the other view's target projection, every other sample of the
    global batch a negative. ctr is the fused InfoNCE of ``clip_loss`` (both directions:
    the paper's ctr takes the prediction -> target direction only; the target side holds
    no gradient, so the second direction adds a column-softmax term to p's gradient).
    The 2 tau factor is the paper's, so the gradient's size does not follow tau."""
    p1, p2 = features["p1"], features["p2"]
    z1, z2 = (features[k].to(p1.dtype) for k in ("z1", "z2"))  # the target is float32
    scale = torch.tensor(1.0 / temperature, device=p1.device)
    return 2 * temperature * (clip_loss(p1, z2, scale, **run) + clip_loss(p2, z1, scale, **run))


def byol_loss(features, **run) -> torch.Tensor:
    """BYOL's normalised mean squared error, symmetrised: sum over the two views of
    mean_i ||p_i - z'_i||^2 = mean_i (2 - 2 p_i . z'_i) for unit p and z' (the other
    view's target projection). No negatives: no collective, no N x N term; this rank's
    micro-batch mean (the accumulation step averages over micro-batches and ranks)."""
    p1, p2, z1, z2 = (features[k].float() for k in ("p1", "p2", "z1", "z2"))
    return (2 - 2 * (p1 * z2).sum(-1)).mean() + (2 - 2 * (p2 * z1).sum(-1)).mean()


def classification_loss(features, **run) -> torch.Tensor:
    """The pretext tasks' cross-entropy of the predicted class ("logits" (B, K)) against
    the label the task made ("labels" (B,)), this rank's micro-batch mean."""
    return torch.nn.functional.cross_entropy(features["logits"].float(), features["labels"])


LOSSES: dict[str, LossSpec] = {
    # CLIP's symmetric InfoNCE: softmax over the global batch, both directions; the
    # paper's temperature 0.07 at the start.
    "infonce": LossSpec(("clip",), {"logit_scale": 1 / 0.07},
                        lambda f, p, config, **run: clip_loss(*_pair(f), p["logit_scale"], **run)),
    # SigLIP: a sigmoid per pair, no softmax over the batch; t = 10, b = -10 at the start
    # (Zhai et al. 2023: log t = log 10, b = -10, against the N^2 - N negatives' weight).
    "siglip": LossSpec(("clip",), {"logit_scale": 10.0, "logit_bias": -10.0},
                       lambda f, p, config, **run: siglip_loss(
                           *_pair(f), p["logit_scale"], p["logit_bias"], **run)),
    # SimCLR's NT-Xent: both views as anchors, 2N - 2 negatives each, fixed temperature.
    "ntxent": LossSpec(("simclr",), {}, lambda f, p, config, **run: ntxent_loss(
        *_pair(f), config.loss.temperature, **run), lambda config: 1 / config.loss.temperature),
    # Hadsell et al.'s margin loss on Euclidean distances: the mean positive pull plus the
    # mean hinge on the N^2 - N negatives, margin loss.margin. SimCLR's views only: CLIP's
    # model holds a logit scale that this loss would leave untrained.
    "margin": LossSpec(("simclr",), {}, lambda f, p, config, **run:
                       margin_contrastive_loss(*_pair(f), config.loss.margin, **run)),
    "moco": LossSpec(("moco",), {}, lambda f, p, config, **run: moco_loss(
        f, config.loss.temperature, **run), lambda config: 1 / config.loss.temperature),
    "byol": LossSpec(("byol",), {}, lambda f, p, config, **run: byol_loss(f)),
    "cross_entropy": LossSpec(("rotation", "relative_patch", "jigsaw"), {},
                              lambda f, p, config, **run: classification_loss(f)),
}  # fmt: skip
# What ``loss.name: null`` (the default) trains each task with.
TASK_LOSS = {"clip": "infonce", "simclr": "ntxent", "moco": "moco", "byol": "byol",
             "rotation": "cross_entropy", "relative_patch": "cross_entropy",
             "jigsaw": "cross_entropy"}  # fmt: skip


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
    """features ({name: (M, D)}, as the task names them), params ({name: 0-dim}) -> the
    loss: over the global batch for the contrastive losses (every rank's rows: the
    kernels gather the others'), over this rank's micro-batch for BYOL's and the pretext
    tasks' (the task's step kind is then plain accumulation: trainer/step.py)."""
    spec = LOSSES[loss_name(config)]
    group = dist.group.WORLD if world_size > 1 else None

    def loss(features: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
        return spec.call(features, params, config, process_group=group,
                         backend=config.engine.loss_backend)  # fmt: skip

    return loss
