"""SimCLR: an encoder f (ResNet or ViT, transformers classes) and the paper's projection
head g, a 2-layer MLP with ReLU (ResNet-50: 2048 -> 2048 -> 128). The loss uses g's
output; f's output is what is kept and handed over (the head is dropped)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

SIMCLR_PRESETS = ("tiny-resnet", "resnet50", "vit-small")


def encoder_config(preset: str, image_size: int):
    if preset == "tiny-resnet":  # the CPU demo's: four stages of one basic block
        return ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                            layer_type="basic")  # fmt: skip
    if preset == "resnet50":
        return ResNetConfig()  # 2048-d features
    if preset == "vit-small":
        return ViTConfig(image_size=image_size, patch_size=16, hidden_size=384, num_hidden_layers=12,
                         num_attention_heads=6, intermediate_size=1536)  # fmt: skip
    raise ValueError(
        f"model.preset must be one of {', '.join(SIMCLR_PRESETS)} for SimCLR, got {preset!r}"
    )


def image_backbone(preset: str, image_size: int) -> tuple[nn.Module, int]:
    """(the transformers encoder f, its feature width F): what every image-only method
    trains and ``megabatch export`` hands over (the ``encoder.*`` weights)."""
    config = encoder_config(preset, image_size)
    if isinstance(config, ResNetConfig):
        return ResNetModel(config), config.hidden_sizes[-1]
    # the [CLS] token's final (layer-normed) state, no BERT-style tanh pooler
    return ViTModel(config, add_pooling_layer=False), config.hidden_size


def backbone_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, S, S) -> f's features (B, F): ResNet's global average pool, ViT's
    [CLS] state."""
    out = encoder(pixel_values=images)
    if isinstance(encoder, ResNetModel):
        return out.pooler_output.flatten(1)  # (B, F, 1, 1) -> (B, F)
    return out.last_hidden_state[:, 0]


class SimCLRModel(nn.Module):
    """images (B, 3, S, S) float -> (h, z): encoder features (B, F) and unit projections (B, E)."""

    def __init__(self, preset: str, image_size: int, embed_dim: int = 128):
        super().__init__()
        self.encoder, width = image_backbone(preset, image_size)
        self.head = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, embed_dim)
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.encoder, images)

    def forward(self, images: torch.Tensor):
        h = self.features(images)
        return h, F.normalize(self.head(h), dim=-1)
