"""The online network of the momentum-encoder methods (MoCo v3, BYOL): the encoder f
(SimCLR's backbones, models/simclr.py), a projector g and a predictor q, each an MLP
with batch norm:

    h = f(x) (B, F)  ->  z = g(h) (B, E)  ->  p = q(z) (B, E)

The loss compares the online p of one view with the target network's z of the other;
the target is an exponential moving average of f and g (trainer/methods/momentum.py),
kept outside this module. Only f is handed over (``megabatch export``: ``encoder.*``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megabatch.trainer.models.simclr import backbone_features, image_backbone


def mlp(in_dim: int, hidden: int, out_dim: int, last_norm: bool) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Linear (-> BN without affine: MoCo v3's last layer)."""
    layers: list[nn.Module] = [
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=not last_norm),
    ]  # fmt: skip
    if last_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class SiameseModel(nn.Module):
    """images (B, 3, S, S) -> unit predictions p (B, E); ``embed`` -> unit projections z
    (what the target network computes), ``features`` -> h (evaluation, export)."""

    def __init__(self, preset: str, image_size: int, embed_dim: int, hidden: int,
                 last_norm: bool):  # fmt: skip
        super().__init__()
        self.encoder, width = image_backbone(preset, image_size)
        self.projector = mlp(width, hidden, embed_dim, last_norm)
        self.predictor = mlp(embed_dim, hidden, embed_dim, last_norm)

    def mirrored(self) -> nn.ModuleDict:
        """f and g, the parts the target network mirrors (``target_embed`` runs a copy)."""
        return nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.encoder, images)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """z = g(f(x)), not normalised (the predictor's input)."""
        return self.projector(self.features(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.predictor(self.project(images)), dim=-1)


def target_embed(mirror: nn.ModuleDict, images: torch.Tensor) -> torch.Tensor:
    """The target network's unit projections z (B, E) of a copy of ``mirrored()``."""
    z = mirror["projector"](backbone_features(mirror["encoder"], images))
    return F.normalize(z, dim=-1)
