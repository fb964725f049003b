"""Image file bytes -> a decoded RGB PIL image, refusing what would decode to more than
``max_pixels`` pixels (``megabatch.data_pipeline.limits``) before decoding it.

One function for everyone who decodes shard images, so that they agree on which images
are usable: the loader's workers (``read.transforms.decode_image``) and ``megabatch data
inspect``; the writer checks its pixel cap with ``check_pixels``. Shared by the write and
the read side. Imports only PIL (no torch), so that the command line stays quick.
"""

import io

from PIL import Image

from megabatch.data_pipeline.limits import DEFAULT_MAX_PIXELS


class CorruptImage(ValueError):
    """The bytes are not an image PIL can decode (truncated, wrong format, ...)."""


class OversizedImage(CorruptImage):
    """The image would decode to more than the pixel cap; it was not decoded."""


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """OversizedImage unless a ``width`` x ``height`` image fits the cap."""
    if width * height > max_pixels:
        raise OversizedImage(
            f"{width} x {height} = {width * height} pixels, over the cap of {max_pixels}"
        )


def decode_rgb(data: bytes, draft_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The whole image as a loaded RGB PIL image. A JPEG decodes at the smallest of
    1/1, 1/2, 1/4, 1/8 scale that keeps both sides >= ``draft_size`` (libjpeg's DCT
    scaling: the pixels we would drop anyway are never made). Raises OversizedImage when
    what would be decoded has more than ``max_pixels`` pixels (nothing decoded), and
    CorruptImage for bytes PIL cannot decode completely."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (draft_size, draft_size))
            check_pixels(*img.size, max_pixels)  # from the header; draft() set the scale
            img.load()
            # convert() copies even when the mode is already RGB (every colour JPEG).
            return img if img.mode == "RGB" else img.convert("RGB")
    except CorruptImage:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own cap (2 x MAX_IMAGE_PIXELS)
        raise OversizedImage(str(exc)) from exc
    except Exception as exc:  # whatever stops a decode (PIL's plugins raise many kinds)
        raise CorruptImage(f"{type(exc).__name__}: {exc}") from exc
