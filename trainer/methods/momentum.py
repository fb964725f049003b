"""The momentum encoder of MoCo v3 and BYOL: a target network that is an exponential
moving average (EMA) of part of the trained model, updated after every optimizer step,

    theta_target <- m theta_target + (1 - m) theta_online,

with m rising from the base momentum m0 to 1 on a cosine over the run (BYOL, Grill et
al. 2020; MoCo v3, Chen et al. 2021):

    m(t) = 1 - (1 - m0) (cos(pi t / T) + 1) / 2,    t the steps done, T the run's steps.

The target is not part of the DeepSpeed module: it takes no gradient, no optimizer state
and, kept in float32, no rounding from a bf16 or fp16 run's weights (an update of
(1 - m) = 0.4 % of a difference is below bf16's resolution of 0.8 %). It is the method's
own state: saved in each checkpoint (``state_dict``) and restored on resume, so that a
resumed run's target is the uninterrupted run's bit for bit. Its batch norms run in
training mode (batch statistics), as the papers' targets do.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """m(t) above: ``base`` at step 0, 1 at the end of the run."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class MomentumTarget:
    """A float32 copy of ``online`` (the parts of the model the target mirrors) that
    follows it by EMA. ``network`` is the copy; call it under ``torch.no_grad``."""

    def __init__(self, online: nn.Module, device: torch.device):
        self.network = copy.deepcopy(online).float().to(device).requires_grad_(False)
        self.network.train()

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """theta_target <- m theta_target + (1 - m) theta_online, parameter by parameter
        (the online weights may be bf16: read in float32). Buffers (batch-norm running
        statistics) are the target's own, updated by its forward passes."""
        online_params = dict(online.named_parameters())
        for name, target in self.network.named_parameters():
            target.lerp_(online_params[name].detach().float(), 1.0 - momentum)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state, strict=True)
