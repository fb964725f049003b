"""CLIP: a ViT image tower and a Transformer text tower (transformers' CLIPModel) with
projections into a shared space and a learnable logit scale.

Built on the transformers classes so the towers can be handed over with
``save_pretrained`` and loaded downstream with ``from_pretrained`` and nothing of ours.
The text feature is the end token's final activation (layer-normed, projected), as in
the paper; our tokenizer's end token is not id 2, which transformers would read as a
legacy config (see megabatch.data_pipeline.read.tokenizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel


@dataclass(frozen=True)
class ClipSize:
    """Tower sizes (Radford et al., 2021, table 19/20; tiny is ours, for the CPU demo)."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    patch_size: int
    text_width: int
    text_layers: int
    text_heads: int


CLIP_PRESETS = {
    "tiny": ClipSize(128, 128, 2, 4, 4, 128, 2, 4),
    "vit-b-32": ClipSize(512, 768, 12, 12, 32, 512, 12, 8),
    "vit-b-16": ClipSize(512, 768, 12, 12, 16, 512, 12, 8),
    "vit-l-14": ClipSize(768, 1024, 24, 16, 14, 768, 12, 12),
}


def clip_config(
    preset: str,
    *,
    image_size: int,
    context_length: int,
    vocab_size: int,
    pad_id: int,
    sot_id: int,
    eot_id: int,
    embed_dim: int | None = None,
    init_logit_scale: float = 1 / 0.07,
) -> CLIPConfig:
    if preset not in CLIP_PRESETS:
        raise ValueError(
            f"model.preset must be one of {', '.join(CLIP_PRESETS)} for CLIP, got {preset!r}"
        )
    size = CLIP_PRESETS[preset]
    if image_size % size.patch_size:
        raise ValueError(
            f"model.image_size {image_size} is not a multiple of the {preset} patch size {size.patch_size}"
        )
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=size.text_width,
            intermediate_size=4 * size.text_width,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_heads,
            max_position_embeddings=context_length,
            pad_token_id=pad_id,
            bos_token_id=sot_id,
            eos_token_id=eot_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=size.patch_size,
            hidden_size=size.vision_width,
            intermediate_size=4 * size.vision_width,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=size.vision_heads,
        ),
        projection_dim=embed_dim or size.embed_dim,
        logit_scale_init_value=math.log(init_logit_scale),
    )


class ClipModel(nn.Module):
    """images (B, 3, S, S) float, tokens (B, L), mask (B, L) -> unit image and text
    features (B, E) and the logit scale exp(t), clamped to at most ``max_logit_scale``;
    with ``init_logit_bias`` (a loss with a bias: SigLIP's), a learnt logit bias too."""

    def __init__(self, config: CLIPConfig, max_logit_scale: float = 100.0,
                 init_logit_bias: float | None = None):  # fmt: skip
        super().__init__()
        self.clip = CLIPModel(config)
        self.max_logit_scale = max_logit_scale
        # transformers keeps log(scale) as a 0-dim Parameter, which DeepSpeed cannot
        # broadcast (it views every parameter as bytes). Train a (1,) copy instead and
        # keep the original as a buffer, so save_pretrained still writes it (see
        # sync_logit_scale).
        init = self.clip.logit_scale.detach().clone()
        del self.clip.logit_scale
        self.clip.register_buffer("logit_scale", init)
        self.log_logit_scale = nn.Parameter(init.reshape(1))
        if init_logit_bias is not None:  # (1,), not 0-dim: as log_logit_scale
            self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=images)  # transformers 5: an output object
        return F.normalize(out.pooler_output, dim=-1)

    def encode_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_text_features(input_ids=tokens, attention_mask=mask.long())
        return F.normalize(out.pooler_output, dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """exp(t) clamped to at most max_logit_scale, 0-dim."""
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale).reshape(())

    @torch.no_grad()
    def sync_logit_scale(self) -> None:
        """Copy the trained scale into the towers' own field before save_pretrained."""
        self.clip.logit_scale.copy_(self.log_logit_scale.reshape(()))

    def forward(self, images, tokens, mask):
        return self.encode_image(images), self.encode_text(tokens, mask), self.logit_scale()
