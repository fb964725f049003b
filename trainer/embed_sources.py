"""What ``megabatch embed`` reads: an image folder, a caption file or WebDataset shards,
as a stream of ``Item`` (key, image, caption) with the inputs that cannot be used skipped
and counted, as the loader counts them (``SKIP_KINDS``).

Images are decoded here, under the loader's caps (``megabatch.data_pipeline.limits``:
pixels from the header before decoding, bytes per file or tar member before reading),
and handed on in their stored mode: the export's image processor does the rest (RGB,
resize, crop, normalise), as it does for a downstream team's ``Image.open``.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.image_decode import CorruptImage, OversizedImage, check_pixels
from megabatch.data_pipeline.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_PIXELS
from megabatch.data_pipeline.read.shard_stream import OVERSIZED, RateLimitedWarnings, read_shard
from megabatch.data_pipeline.shard_format import CAPTION_EXTENSIONS, IMAGE_EXTENSIONS
from megabatch.data_pipeline.shard_specs import resolve_sources

BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which some editors start a file with
# What is skipped, in the summary's order and words: the loader's kinds (loader.SKIP_KINDS)
# and, for an image folder, a file without an image extension or over the byte cap.
SKIP_KINDS = {
    "corrupt_image": "corrupt", "oversized_image": "over max_pixels",
    "not_an_image": "not an image file", "oversized_file": "file over max_member_bytes",
    "oversized_member": "member over max_member_bytes", "missing_image": "no image",
    "missing_caption": "no caption", "bad_caption": "caption not UTF-8",
    "bad_shard": "bad shard",
}  # fmt: skip


class EmbedError(ValueError):
    """Bad input to ``megabatch embed``: one line."""


@dataclass(frozen=True)
class Item:
    key: str
    image: Image.Image | None  # decoded, in its stored mode; None for a caption file
    caption: str | None  # None without captions


@dataclass
class Source:
    """One input, checked. ``items`` streams its usable items (lazily: nothing is decoded
    before it is iterated) and counts the rest in ``skipped``, warning through ``warn``
    (the first few of each kind, then one line every 30 s)."""

    kind: str  # "images", "captions" or "shards"
    where: str  # the folder, file or shard spec as given
    total: int | None  # inputs the progress bar counts (files, lines, samples), if known
    has_images: bool
    has_captions: bool
    items: Iterator[Item]
    skipped: Counter = field(default_factory=Counter)
    warn: RateLimitedWarnings = field(default_factory=RateLimitedWarnings)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The whole image, decoded in its stored mode (the processor converts it to RGB as
    ``CLIPImageProcessor`` does for any caller: alpha over white, which a plain
    ``convert("RGB")`` would not do). The same checks as ``image_decode.decode_rgb``,
    without its reduced-scale JPEG decoding, which would change the pixels:
    OversizedImage over ``max_pixels`` (from the header), CorruptImage for bytes PIL
    cannot decode completely."""
    try:
        image = Image.open(io.BytesIO(data))
        check_pixels(*image.size, max_pixels)
        image.load()
        return image
    except CorruptImage:
        raise
    except UnidentifiedImageError:  # its message names the BytesIO object, nothing else
        raise CorruptImage("not an image format PIL reads") from None
    except Image.DecompressionBombError as exc:
        raise OversizedImage(str(exc)) from exc
    except Exception as exc:  # whatever stops a decode (PIL's plugins raise many kinds)
        raise CorruptImage(f"{type(exc).__name__}: {exc}") from exc


def _decoded(data: bytes, where: str, skipped: Counter, warn) -> Image.Image | None:
    try:
        return open_image(data)
    except OversizedImage as exc:
        skipped["oversized_image"] += 1
        warn("oversized_image", f"{where}: image too large ({exc}; max_pixels), skipped")
    except CorruptImage as exc:
        skipped["corrupt_image"] += 1
        warn("corrupt_image", f"{where}: image does not decode ({exc}), skipped")
    return None


# --------------------------------------------------------------------------- image folder
def image_folder(folder: Path) -> Source:
    """Every file under ``folder``, recursively, in sorted order of its path relative to
    ``folder`` (the key); those without an image extension are counted, not decoded."""
    if not folder.is_dir():
        raise EmbedError(f"--images {folder}: no such folder")
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file())
    if not any(_is_image_name(name) for name, _ in files):
        raise EmbedError(f"--images {folder}: no image files under it "
                         f"({', '.join(sorted(IMAGE_EXTENSIONS))})")  # fmt: skip

    def items() -> Iterator[Item]:
        for key, path in files:
            if not _is_image_name(key):
                source.skipped["not_an_image"] += 1
                source.warn("not_an_image", f"{path}: not an image file (extension), skipped")
                continue
            data = _file_bytes(path, source.skipped, source.warn)
            image = None if data is None else _decoded(data, str(path), source.skipped,
                                                       source.warn)  # fmt: skip
            if image is not None:
                yield Item(key, image, None)

    source = Source("images", str(folder), len(files), True, False, items())
    return source


def _is_image_name(name: str) -> bool:
    return Path(name).suffix[1:].lower() in IMAGE_EXTENSIONS


def _file_bytes(path: Path, skipped: Counter, warn) -> bytes | None:
    """The file's bytes; None (counted) when over the member cap or unreadable."""
    try:
        size = path.stat().st_size
        if size > DEFAULT_MAX_MEMBER_BYTES:
            skipped["oversized_file"] += 1
            warn("oversized_file", f"{path}: {size} bytes, over the "
                 f"{DEFAULT_MAX_MEMBER_BYTES}-byte cap (max_member_bytes), skipped")  # fmt: skip
            return None
        return path.read_bytes()
    except OSError as exc:
        skipped["corrupt_image"] += 1
        warn("corrupt_image", f"{path}: unreadable ({exc}), skipped")
        return None


# --------------------------------------------------------------------------- caption file
def caption_file(path: Path) -> Source:
    """One caption per line, key the line number from 1; blank lines are not captions,
    a line that is not UTF-8 is skipped and counted (``bad_caption``). Read once here to
    count the captions (lines split at \\n, bytes: a bad line keeps its number)."""
    try:
        with open(path, "rb") as f:
            count = sum(1 for line in f if line.strip())
    except OSError as exc:
        raise EmbedError(f"--captions {path}: cannot read it ({exc.strerror or exc})") from None
    if not count:
        raise EmbedError(f"--captions {path}: no captions in it (every line is blank)")

    def items() -> Iterator[Item]:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    caption = raw.removeprefix(BOM if number == 1 else b"").decode("utf-8")
                except UnicodeDecodeError as exc:
                    source.skipped["bad_caption"] += 1
                    source.warn("bad_caption", f"{path} line {number}: not UTF-8 ({exc}), "
                                "skipped")  # fmt: skip
                    continue
                if caption.strip():
                    yield Item(str(number), None, caption.strip())

    source = Source("captions", str(path), count, False, True, items())
    return source


# --------------------------------------------------------------------------- shards
def shards(spec: str, captions: bool) -> Source:
    """The samples of the shards ``spec`` names, shard after shard in the spec's order,
    keyed ``url#key`` as the loader keys them (``Batch.keys``). With ``captions`` the
    first sample says whether the shards have captions: if it has one, every sample
    needs one (the loader's ``captions=True``), else they are embedded as images only."""
    try:
        (resolved,) = resolve_sources(spec)
    except DataError as exc:
        raise EmbedError(f"--shards {spec}: {exc}") from None
    total = sum(resolved.counts) if resolved.counts_known else None
    source = Source("shards", spec, total, True, False, iter(()))
    samples = chain.from_iterable(
        read_shard(url, source.warn, source.skipped, count)
        for url, count in zip(resolved.urls, resolved.counts, strict=True)
    )
    # The peek reads the start of the first shard; the sample is put back.
    first = next(samples, None) if captions else None
    source.has_captions = first is not None and _caption_ext(first) is not None

    def items() -> Iterator[Item]:
        for sample in chain([first] if first is not None else [], samples):
            item = _shard_item(sample, source.has_captions, source.skipped, source.warn)
            if item is not None:
                yield item

    source.items = items()
    return source


def _image_ext(sample: dict) -> str | None:
    return next((e for e in sample if e in IMAGE_EXTENSIONS), None)


def _caption_ext(sample: dict) -> str | None:
    return next((e for e in sample if e in CAPTION_EXTENSIONS), None)


def _shard_item(sample: dict, with_captions: bool, skipped: Counter, warn) -> Item | None:
    """The loader's checks (``_ShardBatches._decode_into``), in its order."""
    where = f"{sample.get('__url__', '?')} key {sample['__key__']}"
    if OVERSIZED in sample:
        skipped["oversized_member"] += 1
        warn("oversized_member", f"{where}: member {sample[OVERSIZED]} is over the "
             f"{DEFAULT_MAX_MEMBER_BYTES}-byte cap (max_member_bytes), skipped")  # fmt: skip
        return None
    image_ext = _image_ext(sample)
    if image_ext is None:
        skipped["missing_image"] += 1
        warn("missing_image", f"{where}: no image member, skipped")
        return None
    caption = None
    if with_captions:
        caption = _caption(sample, where, skipped, warn)
        if caption is None:
            return None
    image = _decoded(sample[image_ext], where, skipped, warn)
    if image is None:
        return None
    return Item(f"{sample.get('__url__', '')}#{sample['__key__']}", image, caption)


def _caption(sample: dict, where: str, skipped: Counter, warn) -> str | None:
    ext = _caption_ext(sample)
    try:
        caption = sample[ext].decode("utf-8").strip() if ext else ""
    except UnicodeDecodeError as exc:
        skipped["bad_caption"] += 1
        warn("bad_caption", f"{where}: caption is not UTF-8 ({exc}), skipped")
        return None
    if not caption:
        skipped["missing_caption"] += 1
        warn("missing_caption", f"{where}: no caption, skipped")
        return None
    return caption


def skip_summary(skipped: Counter) -> str:
    """``"2 (1 corrupt, 1 not an image file)"``, or ``"0"``."""
    said = [f"{skipped[kind]} {words}" for kind, words in SKIP_KINDS.items() if skipped[kind]]
    total = sum(skipped[kind] for kind in SKIP_KINDS)
    return f"{total} ({', '.join(said)})" if said else str(total)
