"""Image work: per sample in the loader's workers (decode, centre square, resize), and
batched on the training device (resize to the model's input, normalise).

Workers hand the trainer uint8 images, (B, 3, S, S) in channels-last memory: a quarter
of the bytes of float32 through the worker queues and the host-to-device copy, and no
transpose copy on the CPU. What needs floats happens on the training device, batched:
``device_preprocess`` for CLIP, ``data_pipeline.views`` for SimCLR.

Resampling is the expensive part of a worker's job (on the development machine a
256 -> 224 PIL resize costs more than the JPEG decode). When the shards' images are
already square at a fixed side (img2dataset's center_crop output, the demo), set
``ImageConfig.load_size`` to that side: workers then only decode, and the device
resizes the batch to ``size``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# CLIP's normalisation constants (Radford et al., 2021), the usual default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CorruptImage(ValueError):
    """The bytes are not an image PIL can decode (truncated, wrong format, ...)."""


@dataclass(frozen=True)
class ImageConfig:
    size: int = 224
    """Side of the square image the model sees."""
    load_size: int | None = None
    """Side of the square image the workers produce (None: ``size``). Images whose centred
    square already has this side are not resampled in the workers."""
    mean: tuple[float, float, float] = CLIP_MEAN
    """Per-channel mean subtracted on the device (``normalize``)."""
    std: tuple[float, float, float] = CLIP_STD
    """Per-channel standard deviation divided on the device."""


def decode_resize_crop(data: bytes, size: int) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8: the centred square of the image,
    resized to ``size`` (antialiased bilinear). Raises CorruptImage for bytes PIL cannot
    decode completely."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # JPEG can decode at 1/2, 1/4, 1/8 scale for free: skip pixels we would drop.
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise CorruptImage(f"{type(exc).__name__}: {exc}") from exc
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = (left, top, left + side, top + side)
    if (width, height) == (size, size):
        pass  # already what we want: no copy
    elif side == size:
        img = img.crop(square)
    else:
        # One pass over the centred square straight to size x size: the same pixels as
        # resizing the shorter side then cropping, without the intermediate image.
        # Bilinear (antialiased when shrinking) costs about 2/3 of bicubic here.
        img = img.resize((size, size), Image.Resampling.BILINEAR, box=square)
    return np.asarray(img, dtype=np.uint8)  # (size, size, 3), one copy out of PIL


def new_image_batch(batch_size: int, size: int, shared: bool) -> torch.Tensor:
    """An empty (batch_size, size, size, 3) uint8 batch to fill sample by sample. In a
    DataLoader worker it is put in shared memory up front, so handing it to the main
    process moves no bytes (otherwise the loader copies every batch into shared memory)."""
    batch = torch.empty((batch_size, size, size, 3), dtype=torch.uint8)
    return batch.share_memory_() if shared else batch


def as_nchw(batch: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) -> (B, 3, H, W) view: channels-last memory, no copy."""
    return batch.permute(0, 3, 1, 2)


def device_preprocess(images: torch.Tensor, config: ImageConfig) -> torch.Tensor:
    """CLIP's input: (B, 3, L, L) uint8 -> (B, 3, size, size) float32 normalised, resized
    (antialiased bilinear) on the images' device when the workers' side L differs."""
    x = images.float().div_(255.0)
    if x.shape[-1] != config.size:
        x = torch.nn.functional.interpolate(
            x, size=(config.size, config.size), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    return normalize(x, config.mean, config.std)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 (0-255) or float (0-1) -> float32 (x - mean) / std, on the
    images' device."""
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t).div_(std_t)
