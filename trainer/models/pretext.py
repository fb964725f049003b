"""The pretext tasks' network (rotation, relative patch position, jigsaw): SimCLR's
encoder f (models/simclr.py, so ``megabatch export`` hands over the same transformers
class) run on each of a sample's k inputs with shared weights, and a classifier over the
concatenation of their features, the papers' late fusion:

    inputs (B, k, 3, P, P) -> f -> (B k, F) -> (B, k F) -> head -> logits (B, K)
    head: Linear(k F, H) -> BatchNorm -> ReLU -> Linear(H, K)

k = 1 and K = 4 for rotation (Gidaris et al. 2018), k = 2 and K = 8 for relative patch
position (Doersch et al. 2015: two patches, fused after a shared trunk), k = 9 and K the
permutation count for jigsaw (Noroozi & Favaro 2016: nine tiles, one fused classifier).
Only f is kept; the head is named ``head`` as SimCLR's projection head is, and dropped
on export the same way."""

from __future__ import annotations

import torch
from torch import nn

from megabatch.trainer.models.simclr import backbone_features, image_backbone


class PretextModel(nn.Module):
    """inputs (B, k, 3, P, P) float -> logits (B, K); ``features`` (B, 3, S, S) -> f's
    (B, F) (evaluation)."""

    def __init__(self, preset: str, image_size: int, inputs_per_sample: int, classes: int,
                 hidden: int | None = None):  # fmt: skip
        super().__init__()
        self.encoder, width = image_backbone(preset, image_size)
        self.inputs_per_sample = inputs_per_sample
        hidden = hidden or 2 * width
        self.head = nn.Sequential(
            nn.Linear(inputs_per_sample * width, hidden, bias=False), nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True), nn.Linear(hidden, classes),
        )  # fmt: skip

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.encoder, images)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, k = inputs.shape[:2]
        if k != self.inputs_per_sample:
            raise ValueError(f"expected {self.inputs_per_sample} inputs per sample, got {k}")
        h = self.features(inputs.flatten(0, 1))  # (B k, F): the k inputs in one batch
        return self.head(h.reshape(b, -1))
