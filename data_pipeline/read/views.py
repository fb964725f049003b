"""SimCLR's two augmented views, made batched on the training device with kornia.

The recipe of Chen et al. (2020): random resized crop (area 0.08-1, aspect 3/4-4/3) with
a horizontal flip; colour jitter of strength s (brightness, contrast, saturation 0.8 s,
hue 0.2 s) with p = 0.8; grayscale with p = 0.2; Gaussian blur with p = 0.5, kernel
about 10% of the side, sigma in [0.1, 2.0]. Crop and colour together matter most.

Randomness is keyed by an integer seed per call: the same images and the same seed give
the same two views, bit for bit. The trainer's gradient-cache pass re-runs each
micro-batch and replays its seed, so the re-run sees the views the cached features saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import torch
from torch import nn

from megabatch.data_pipeline.read.transforms import CLIP_MEAN, CLIP_STD, normalize


@dataclass(frozen=True)
class ViewConfig:
    size: int = 224
    """Side of each view."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area fraction range of the random resized crop."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio range of the random resized crop."""
    color_strength: float = 1.0
    """s in the paper: jitter brightness, contrast, saturation by 0.8 s and hue by 0.2 s."""
    color_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


class SimCLRViews(nn.Module):
    """(B, 3, H, W) uint8 images -> two (B, 3, size, size) float32 normalised views."""

    def __init__(self, config: ViewConfig = ViewConfig()):
        super().__init__()
        self.config = config
        s = config.color_strength
        kernel = max(3, int(0.1 * config.size) // 2 * 2 + 1)  # odd, about 10% of the side
        self.augment = K.AugmentationSequential(
            K.RandomResizedCrop((config.size, config.size), scale=config.crop_scale,
                                ratio=config.crop_ratio),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=config.color_p),
            K.RandomGrayscale(p=config.grayscale_p),
            K.RandomGaussianBlur((kernel, kernel), config.blur_sigma, p=config.blur_p),
        )  # fmt: skip

    @torch.no_grad()
    def forward(self, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float().div_(255.0)
        devices = [images.device] if images.device.type == "cuda" else []
        # A private RNG stream per call: replayable, and the caller's RNG is left as it was.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            view1, view2 = self.augment(x), self.augment(x)
        mean, std = self.config.mean, self.config.std
        return normalize(view1, mean, std), normalize(view2, mean, std)
