"""Write a source's samples into WebDataset tar shards with a manifest.

Layout (``shard_format``): ``00000.tar``, ``00001.tar``, ... each holding ``KEY.jpg``,
``KEY.txt`` (when the source has captions) and ``KEY.json`` per sample, KEY the sample's
zero-padded index in the source; then ``manifest.json`` (every shard with its sample
count, the total, the source, the split, the skipped samples; ``manifest`` owns the
format) written last.

Crash safety and resume. A shard is written as ``NNNNN.tar.partial`` and renamed into
place only when complete; the manifest likewise, and only after the last shard. Which
sample lands in which shard is a pure function of the source's sample order and the
shard options: a shard starts at a given sample and closes when the next sample would
break a limit. So a rerun of the same command after a crash (the same source list and
options; checked with a fingerprint) continues where the last *complete* shard ended
and produces the same bytes an uninterrupted run would have. To know where that is
without re-reading shards, the writer keeps a journal, ``write_progress.jsonl``: a
fingerprint line, then one line per shard appended (and fsynced) after its rename, with
the sample range it covers and the samples it skipped. On a rerun:

- ``*.partial`` leftovers are deleted;
- journaled shards whose file is present with the recorded size are kept; a shard that
  was renamed but not yet journaled when the process died, or anything after a torn
  journal line, is deleted and written again (identically);
- writing resumes at the sample after the last kept shard.

Once the manifest exists the journal is deleted, and rerunning the same command is a
no-op. A folder holding a different source's or options' shards, or ``.tar`` files the
writer did not record, is refused (``DataError``) rather than mixed or deleted.

Samples that cannot be read (an image that does not decode, an image over the pixel
cap, an unreadable or empty caption) are skipped, never silently: each is listed in the
manifest's ``skipped`` with its source id and the reason, and counted in the result.
Reasons are stable (no object addresses, no paths: the id says which sample), so that
two writes of the same input give the same manifest. An image is decoded only if its
header says it fits ``max_pixels`` (``megabatch.data_pipeline.limits``). Problems with the source
as a whole (missing files, unknown columns) are found earlier, by the source itself.
"""

import contextlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.image_decode import OversizedImage, check_pixels
from megabatch.data_pipeline.limits import DEFAULT_MAX_PIXELS, check_cap
from megabatch.data_pipeline.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    manifest_dict,
    read_manifest,
    write_manifest,
)
from megabatch.data_pipeline.shard_format import (
    PARTIAL_SUFFIX,
    SHARD_NAME_RE,
    sample_key,
    shard_name,
    tar_archive_bytes,
    tar_member_bytes,
)
from megabatch.data_pipeline.write.sources import SampleError, SampleSource

JOURNAL_NAME = "write_progress.jsonl"
# Fields the writer puts into every sample's .json; a source's metadata may not use them.
_RESERVED_JSON_FIELDS = frozenset({"key", "source", "caption", "width", "height"})
# An object's repr in an exception's text ("cannot identify image file <_io.BytesIO
# object at 0x7f...>"): an address that differs from run to run.
_OBJECT_REPR_RE = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
# PIL's names for files that are already JPEG (MPO: a phone camera's multi-picture JPEG).
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})


@dataclass
class ShardOptions:
    """How samples are packed into shards."""

    max_samples_per_shard: int | None = 10_000
    """Close a shard after this many samples (img2dataset's default); None: no limit."""
    max_bytes_per_shard: int | None = None
    """Close a shard before its tar file would grow past this many bytes; None: no
    limit. A sample too big for an empty shard still gets a shard of its own. Python's
    tarfile pads every archive to 10 KiB, so limits below that mean one sample a shard."""
    jpeg_quality: int = 95
    """Quality of the images encoded to JPEG; JPEG input is copied unchanged."""
    show_progress: bool | None = None
    """Progress bar on stderr; None: only when stderr is a terminal (tqdm's rule)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """An image whose header says it has more pixels is skipped, never decoded."""

    def validate(self) -> None:
        for name in ("max_samples_per_shard", "max_bytes_per_shard"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if self.max_samples_per_shard is None and self.max_bytes_per_shard is None:
            raise DataError("set max_samples_per_shard or max_bytes_per_shard (or both)")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality must be an integer in 1..100, got {self.jpeg_quality!r}")
        check_cap("max_pixels", self.max_pixels)

    def packing(self) -> dict[str, int | None]:
        """The options that decide the shards' bytes (not the progress bar)."""
        packing = {
            "max_samples_per_shard": self.max_samples_per_shard,
            "max_bytes_per_shard": self.max_bytes_per_shard,
            "jpeg_quality": self.jpeg_quality,
        }
        # Only when changed: shard sets written before the cap existed keep their
        # fingerprint (a rerun still finds them complete).
        if self.max_pixels != DEFAULT_MAX_PIXELS:
            packing["max_pixels"] = self.max_pixels
        return packing


@dataclass(frozen=True)
class WriteResult:
    out_dir: Path
    manifest: dict[str, Any]
    shards_kept: int
    """Complete shards found from an earlier run (all of them if it had finished)."""
    shards_written: int
    already_complete: bool = False
    """The folder held this write's finished shard set: nothing was done."""

    @property
    def total_samples(self) -> int:
        return self.manifest["total_samples"]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        return self.manifest["skipped"]


@dataclass
class ShardRecord:
    """One complete shard, as the journal and the manifest know it."""

    name: str
    samples: int
    bytes: int
    first_index: int
    """Source index of the shard's first sample."""
    next_index: int
    """Source index the next shard starts from (skipped samples in between are this
    shard's)."""
    skipped: list[dict[str, Any]] = field(default_factory=list)


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and parents) and check that files can be created in it; on
    failure remove what was created and raise ``DataError``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder")
    first_created = out_dir if not out_dir.exists() else None
    while first_created is not None and not first_created.parent.exists():
        first_created = first_created.parent
    probe = out_dir / f".megabatch-probe-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        if first_created is not None:
            shutil.rmtree(first_created, ignore_errors=True)
        raise DataError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from exc


def encode_jpeg(
    image: bytes | Image.Image, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height). Encoded bytes are decoded in full first, so that a
    truncated or corrupt file fails here rather than in a training run; JPEG files are
    then kept byte for byte (re-encoding would only lose quality). Anything else is
    converted to RGB, transparency flattened onto white, and encoded at ``quality``.
    An image of more than ``max_pixels`` pixels raises OversizedImage, decoded or not
    (bytes: checked from the header, before decoding)."""
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as opened:
            check_pixels(opened.width, opened.height, max_pixels)
            opened.load()
            if opened.format in _JPEG_FORMATS:
                return image, opened.width, opened.height
            # Encoded before the `with` closes the image (a closed image has no pixels).
            return _encode(_to_rgb(opened), quality)
    check_pixels(image.width, image.height, max_pixels)
    return _encode(_to_rgb(image), quality)


def _encode(rgb: Image.Image, quality: int) -> tuple[bytes, int, int]:
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), rgb.width, rgb.height


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def stable_reason(exc: BaseException) -> str:
    """``exc`` as a skip reason that is the same every run: its type and message, less
    any object repr (PIL names the BytesIO it read, address and all)."""
    text = _OBJECT_REPR_RE.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _sample_members(
    source: SampleSource, index: int, options: ShardOptions
) -> tuple[list[tuple[str, bytes]], None] | tuple[None, str]:
    """The tar members (extension, bytes) of sample ``index``, or None and the reason
    it has to be skipped (stable: see ``stable_reason``)."""
    try:
        sample = source.load(index)
    except SampleError as exc:
        return None, _OBJECT_REPR_RE.sub("", str(exc))
    caption = (sample.caption or "").strip() if source.has_captions else None
    if source.has_captions and not caption:
        return None, "empty caption"
    try:
        jpeg, width, height = encode_jpeg(sample.image, options.jpeg_quality, options.max_pixels)
    except OversizedImage as exc:
        return None, f"image too large: {exc} (max_pixels)"
    except Exception as exc:  # whatever stops a decode: PIL's plugins raise many kinds
        return None, f"image does not decode: {stable_reason(exc)}"

    clash = _RESERVED_JSON_FIELDS.intersection(sample.metadata)
    if clash:
        raise ValueError(f"source metadata may not use the writer's fields {sorted(clash)}")
    key = sample_key(index)
    record = {**sample.metadata, "key": key, "source": sample.id, "width": width, "height": height}
    members = [("jpg", jpeg)]
    if caption is not None:
        record["caption"] = caption
        members.append(("txt", caption.encode("utf-8")))
    # sort_keys: the same sample always gives the same bytes (resume compares equal).
    members.append(("json", json.dumps(record, sort_keys=True, ensure_ascii=False).encode()))
    return members, None


class _ShardFile:
    """A shard being written under its temporary name."""

    def __init__(self, out_dir: Path, shard_index: int, first_index: int):
        self.name = shard_name(shard_index)
        self.path = out_dir / self.name
        self.partial_path = out_dir / (self.name + PARTIAL_SUFFIX)
        self.first_index = first_index
        self.samples = 0
        self.members_bytes = 0
        self._file = open(self.partial_path, "wb")
        # ustar: plain 512-byte headers, so the size is predictable (tar_member_bytes);
        # TarInfo's fixed defaults (mtime 0, uid 0, mode 644) make the bytes repeatable.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def is_full(self, sample_bytes: int, options: ShardOptions) -> bool:
        """Would adding a sample of ``sample_bytes`` (tar bytes) break a limit?"""
        if self.samples == 0:
            return False
        if options.max_samples_per_shard is not None:
            if self.samples >= options.max_samples_per_shard:
                return True
        if options.max_bytes_per_shard is not None:
            size = tar_archive_bytes(self.members_bytes + sample_bytes)
            if size > options.max_bytes_per_shard:
                return True
        return False

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            self._tar.addfile(info, io.BytesIO(data))
            self.members_bytes += tar_member_bytes(len(data))
        self.samples += 1

    def finish(self, next_index: int, skipped: list[dict[str, Any]]) -> ShardRecord:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.partial_path, self.path)
        return ShardRecord(
            name=self.name,
            samples=self.samples,
            bytes=self.path.stat().st_size,
            first_index=self.first_index,
            next_index=next_index,
            skipped=skipped,
        )

    def discard(self) -> None:
        # Already failing (a full disk, say): closing may fail too; the file goes anyway.
        with contextlib.suppress(OSError, tarfile.TarError):
            self._tar.close()
        with contextlib.suppress(OSError):
            self._file.close()
        self.partial_path.unlink(missing_ok=True)


def _fingerprint(source: SampleSource, options: ShardOptions, split: str | None) -> dict[str, Any]:
    """Everything the shards' bytes depend on: a rerun resumes or counts as done only if
    it matches."""
    return {
        "format_version": MANIFEST_VERSION,
        "split": split,
        "source": source.description,
        "source_samples": len(source),
        "source_digest": source.digest(),
        "has_captions": source.has_captions,
        **options.packing(),
    }


def _write_journal(path: Path, fingerprint: dict[str, Any], records: list[ShardRecord]) -> None:
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        for record in records:
            f.write(json.dumps(asdict(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resume(out_dir: Path, fingerprint: dict[str, Any]) -> list[ShardRecord]:
    """The complete shards an interrupted run of the same write left, after deleting
    its ``*.partial`` files and every other shard file; rewrites the journal to exactly
    those. Refuses (before deleting anything) a folder of another write."""
    journal_path = out_dir / JOURNAL_NAME
    shard_files = sorted(p for p in out_dir.iterdir() if SHARD_NAME_RE.match(p.name))
    if not journal_path.exists():
        if shard_files:
            raise DataError(
                f"output folder {out_dir} already holds shards ({shard_files[0].name}, ...) "
                "that this writer did not record; write to an empty folder"
            )
        _remove_partials(out_dir)
        _write_journal(journal_path, fingerprint, [])
        return []

    lines = journal_path.read_text(encoding="utf-8").splitlines()
    try:
        earlier = json.loads(lines[0])["fingerprint"]
    except (IndexError, KeyError, TypeError, json.JSONDecodeError):
        raise DataError(f"cannot read {journal_path}; delete {out_dir} and start again") from None
    if earlier != fingerprint:
        raise DataError(
            f"output folder {out_dir} holds an interrupted write of another source or with "
            "other options; rerun that command to finish it, or delete the folder"
        )
    _remove_partials(out_dir)
    records: list[ShardRecord] = []
    next_index = 0
    for line in lines[1:]:
        try:
            record = ShardRecord(**json.loads(line))
        except (TypeError, json.JSONDecodeError):
            break  # the line the crash cut short: that shard is written again
        path = out_dir / record.name
        if (
            record.name != shard_name(len(records))
            or record.first_index != next_index
            or not path.is_file()
            or path.stat().st_size != record.bytes
        ):
            break
        records.append(record)
        next_index = record.next_index
    kept = {record.name for record in records}
    for path in shard_files:
        if path.name not in kept:
            path.unlink()
    _write_journal(journal_path, fingerprint, records)
    return records


def _remove_partials(out_dir: Path) -> None:
    for path in out_dir.glob("*" + PARTIAL_SUFFIX):
        path.unlink()


def write_shards(
    source: SampleSource,
    out_dir: Path,
    options: ShardOptions | None = None,
    split: str | None = None,
    on_shard_complete: Callable[[ShardRecord], None] | None = None,
) -> WriteResult:
    """Write ``source`` into shards in ``out_dir``, resuming an interrupted run of the
    same write (see the module's docstring). ``on_shard_complete`` is called after each
    shard is renamed into place and journaled."""
    options = options if options is not None else ShardOptions()
    options.validate()
    if len(source) == 0:
        raise DataError(f"no samples in {source.description}")
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir)
    fingerprint = _fingerprint(source, options, split)
    manifest_path = out_dir / MANIFEST_NAME
    journal_path = out_dir / JOURNAL_NAME

    if manifest_path.exists():
        manifest = read_manifest(manifest_path).data
        if manifest.get("fingerprint") != fingerprint:
            raise DataError(
                f"output folder {out_dir} already holds a finished shard set of another "
                "source or with other options; write to an empty folder"
            )
        _remove_partials(out_dir)
        journal_path.unlink(missing_ok=True)  # left if the crash came right after the manifest
        return WriteResult(out_dir, manifest, len(manifest["shards"]), 0, already_complete=True)

    records = _resume(out_dir, fingerprint)
    shards_kept = len(records)
    start = records[-1].next_index if records else 0
    pending_skips: list[dict[str, Any]] = []  # skipped since the last finished shard
    shard: _ShardFile | None = None
    ids = source.ids()
    progress = tqdm(
        total=len(source),
        initial=start,
        unit="sample",
        desc=split or out_dir.name,
        disable=None if options.show_progress is None else not options.show_progress,
    )
    try:
        with open(journal_path, "a", encoding="utf-8") as journal:

            def finish(shard: _ShardFile, next_index: int) -> None:
                record = shard.finish(next_index, list(pending_skips))
                pending_skips.clear()
                journal.write(json.dumps(asdict(record)) + "\n")
                journal.flush()
                os.fsync(journal.fileno())
                records.append(record)
                if on_shard_complete is not None:
                    on_shard_complete(record)

            for index in range(start, len(source)):
                members, reason = _sample_members(source, index, options)
                progress.update()
                if members is None:
                    pending_skips.append({"index": index, "source": ids[index], "reason": reason})
                    continue
                sample_bytes = sum(tar_member_bytes(len(data)) for _, data in members)
                if shard is not None and shard.is_full(sample_bytes, options):
                    finish(shard, next_index=index)
                    shard = None
                if shard is None:
                    shard = _ShardFile(out_dir, len(records), first_index=index)
                    progress.set_postfix_str(shard.name)
                shard.add(sample_key(index), members)
            if shard is not None:
                finish(shard, next_index=len(source))
                shard = None
    except BaseException:
        if shard is not None:
            shard.discard()
        raise
    finally:
        progress.close()

    skipped = [skip for record in records for skip in record.skipped] + pending_skips
    total = sum(record.samples for record in records)
    if total == 0:
        journal_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # only if empty: nothing of this write is left behind
        first = skipped[0]
        raise DataError(
            f"none of the {len(source)} samples of {source.description} could be read; "
            f"first: {first['source']}: {first['reason']}"
        )
    manifest = manifest_dict(
        split=split,
        source=source.description,
        has_captions=source.has_captions,
        shards=[
            {"name": record.name, "samples": record.samples, "bytes": record.bytes}
            for record in records
        ],
        skipped=skipped,
        fingerprint=fingerprint,
    )
    write_manifest(manifest_path, manifest)
    journal_path.unlink()
    return WriteResult(out_dir, manifest, shards_kept, len(records) - shards_kept)
