"""Caps on what one sample may cost whoever reads it: shards come from anywhere, and a
few hundred bytes on disk can ask for gigabytes once decoded.

- ``max_pixels``: pixels an image may decode to, checked from its header before any
  pixel is decoded (for a JPEG, after PIL's ``draft()`` reduction, which is what is
  actually decoded). A 12000 x 12000 PNG of one colour is 420 KB on disk and 432 MB as
  RGB. The default, 2**26 (8192 x 8192), is far above any image worth training on and
  bounds a decode to 192 MB of RGB (256 MB for the 4-byte modes).
- ``max_member_bytes``: bytes one tar member may hold, checked from its header before
  its data is read; a bigger member is streamed past, never held in memory. A gzip'd tar
  compresses a run of zeros about 1000:1, so a 1.5 MB download can hold a 1.5 GB member.
  The default, 64 MiB, is well above any image file of at most ``max_pixels`` pixels
  that shards hold in practice.

What exceeds a cap is skipped and counted (``oversized_image``, ``oversized_member``)
by the loader and reported by ``megabatch data inspect``, with the same caps.
"""

from megabatch.data_pipeline.errors import DataError

DEFAULT_MAX_PIXELS = 2**26
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20


def check_cap(name: str, value: object) -> None:
    """DataError naming ``name`` unless ``value`` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
