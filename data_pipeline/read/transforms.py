"""Image work: per sample in the loader's workers (decode, centre square, resize), and
batched on the training device (resize to the model's input, normalise).

Workers hand the trainer uint8 images, (B, 3, S, S) in channels-last memory: a quarter
of the bytes of float32 through the worker queues and the host-to-device copy, and no
transpose copy on the CPU. What needs floats happens on the training device, batched:
``device_preprocess`` for CLIP, ``megabatch.data_pipeline.read.views`` for SimCLR.

Resampling is the expensive part of a worker's job (a 256 -> 224 PIL resize costs more
than the JPEG decode: the clip and clip-resize rows of docs/benchmarks-data.md). When
the shards' images are already square at a fixed side (img2dataset's center_crop
output, the demo), set ``ImageConfig.load_size`` to that side: workers then only decode,
and the device resizes the batch to ``size``.

Decoding writes each image straight into its slot of the batch (``decode_into``). With
PIL that takes one packing pass (PIL holds RGB as 4 bytes a pixel). With ``simplejpeg``
(a dependency, imported optionally), a JPEG that already has the batch's side is decoded
by it (libjpeg-turbo, as in PIL, with the same accurate DCT and upsampling) directly into
the slot, with no PIL image and no packing; everything else, and any JPEG simplejpeg
will not decode cleanly, goes through PIL, so which samples are skipped does not depend
on the decoder. Either way an image that would decode to more than
``ImageConfig.max_pixels`` pixels is refused from its header (``OversizedImage``; see
``image_decode`` and ``limits``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# CorruptImage and OversizedImage are what decode_into raises: importable from here.
from megabatch.data_pipeline.image_decode import CorruptImage, OversizedImage, decode_rgb  # noqa: F401
from megabatch.data_pipeline.limits import DEFAULT_MAX_PIXELS

try:  # optional: a faster path for JPEGs that need no resampling
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

# CLIP's normalisation constants (Radford et al., 2021), the usual default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DECODERS = ("auto", "pil", "simplejpeg")


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
    decoder: str = "auto"
    """JPEG decoding in the workers: ``simplejpeg`` for JPEGs already at the workers' side
    (the rest through PIL), ``pil`` for everything, ``auto`` for simplejpeg when it is
    installed, else PIL."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Pixels an image may decode to (a JPEG: after its reduced-scale decoding); a bigger
    one is skipped unread (``oversized_image``). See ``megabatch.data_pipeline.limits``."""


def check_decoder(decoder: str) -> None:
    """A ValueError naming the problem when ``decoder`` cannot be used here."""
    if decoder not in DECODERS:
        raise ValueError(f"image decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "simplejpeg" and simplejpeg is None:
        raise ValueError("image decoder 'simplejpeg' is not installed (pip install simplejpeg)")


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Image file bytes -> the centred square of the image as an RGB PIL image of side
    ``size`` (resized, antialiased bilinear, when its side differs). Raises
    OversizedImage for an image that would decode to more than ``max_pixels`` pixels
    (JPEGs: after their reduced-scale decoding, ``image_decode.decode_rgb``) and
    CorruptImage for bytes PIL cannot decode completely. The decoding every pipeline
    stage shares: the benchmark's decode stage times exactly this."""
    rgb = decode_rgb(data, size, max_pixels)
    width, height = rgb.size
    if (width, height) == (size, size):
        return rgb  # already what we want: no copy
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = (left, top, left + side, top + side)
    if side == size:
        return rgb.crop(square)
    # One pass over the centred square straight to size x size: the same pixels as
    # resizing the shorter side then cropping, without the intermediate image.
    # Bilinear (antialiased when shrinking): cheaper than bicubic (docs/benchmarks-data.md,
    # "Measurements").
    return rgb.resize((size, size), Image.Resampling.BILINEAR, box=square)


def decode_into(
    data: bytes, out: np.ndarray, decoder: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
) -> None:
    """Decode image bytes straight into ``out``, a C-contiguous (size, size, 3) uint8 slot
    of a batch: the pixels of ``decode_image``, written in place. With simplejpeg (see
    ``ImageConfig.decoder``) a JPEG of side ``size`` is decoded into ``out`` directly;
    otherwise PIL decodes and one pass packs its RGBX pixels into ``out``. Raises
    OversizedImage or CorruptImage, as ``decode_image``."""
    if decoder != "pil" and jpeg_into(data, out, max_pixels):
        return
    _pack_rgb(decode_image(data, out.shape[0], max_pixels), out)


def jpeg_into(data: bytes, out: np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """simplejpeg's half of ``decode_into``: True when ``data`` is a colour or grey JPEG
    of exactly ``out``'s side, decoded into ``out`` without a warning; False (``out``
    undefined) when simplejpeg is not installed or declines, and PIL must decide."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return False
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if (height, width) != out.shape[:2] or colorspace not in ("YCbCr", "Gray"):
            return False  # resampling, or a CMYK/YCCK conversion: PIL's job
        if height * width > max_pixels:
            return False  # PIL refuses it: the same verdict whichever decoder runs
        # Accurate integer DCT and smooth upsampling: PIL's (libjpeg's) defaults, so the
        # pixels equal PIL's. strict: a warning (e.g. a truncated file) raises, and PIL
        # then decides whether the sample decodes or is skipped.
        simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False, buffer=out,
                               strict=True)  # fmt: skip
    except ValueError:
        return False
    return True


def decode_resize_crop(
    data: bytes, size: int, decoder: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8 (``decode_into`` a new array)."""
    out = np.empty((size, size, 3), dtype=np.uint8)
    decode_into(data, out, decoder, max_pixels)
    return out


def _pack_rgb(image: Image.Image, out: np.ndarray) -> None:
    # PIL keeps RGB as 4 bytes a pixel; its raw encoder packs them to 3. tobytes() and
    # np.asarray() run it in 64 KiB chunks and join them (a second copy): one chunk of
    # the whole image instead, then one copy into the batch.
    try:
        encoder = Image._getencoder("RGB", "raw", ("RGB", 0, 1))
        try:
            encoder.setimage(image.im, (0, 0, *image.size))
            _, status, data = encoder.encode(out.nbytes + 1)
        finally:
            encoder.cleanup()
    except (AttributeError, TypeError):  # PIL's private encoder API moved: the public way
        status, data = 0, b""
    if status == 1 and len(data) == out.nbytes:  # 1: the whole image in this one chunk
        out[...] = np.frombuffer(data, dtype=np.uint8).reshape(out.shape)
    else:
        out[...] = np.asarray(image)


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
