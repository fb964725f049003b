"""Check a set of WebDataset shards before training on them.

Counts shards and samples, decodes every image the way the loader does
(``image_decode.decode_rgb``: a JPEG at the reduced scale the loader's side allows,
``image_size``) and reports, by shard and key:

- ``missing_shard``: a shard the specification names is not there;
- ``unreadable_tar``: a tar that cannot be opened, is cut short (a member's data or the
  end-of-archive marker missing) or is otherwise corrupt;
- ``sample_count``: a shard's sample count differs from its manifest's;
- ``corrupt_image``: an image member that does not decode;
- ``oversized_image``: an image that would decode to more than ``max_pixels`` pixels
  (not decoded);
- ``oversized_member``: a member of more than ``max_member_bytes`` (not read); the
  loader skips its sample, so nothing else is checked in it;
- ``missing_image``: a sample (key) with no image member;
- ``missing_caption``: a sample with no caption (``.txt``) when captions are expected:
  as the manifest says, as the caller says, or else when any sample of the set has one;
- ``empty_caption`` / ``bad_caption``: a caption that is empty or not UTF-8;
- ``duplicate_member``: the same ``KEY.ext`` twice in a row (WebDataset keeps one).

Reads any WebDataset tars, img2dataset's included: members are grouped by key the way
WebDataset groups them, and the ``_stats.json`` and ``.parquet`` files img2dataset writes
beside its tars are ignored.

Names are paths: a shard named ``pipe:CMD`` in a manifest or a folder is a file of that
name (missing, most likely), never a command; shards are opened with ``open()`` only.
"""

import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megabatch.data_pipeline.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_PIXELS
from megabatch.data_pipeline.shard_format import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    TAR_BLOCK,
    split_member_name,
)
from megabatch.data_pipeline.shard_specs import ShardSpec, resolve_shards
from megabatch.data_pipeline.tar_members import READ_ERRORS, capped_tarinfo, plain_stream

# The side the loader decodes to by default (ImageConfig's size): what a JPEG's reduced
# scale decoding is judged at when the caller does not say.
DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str | None
    """None when the problem is the shard's as a whole."""
    kind: str
    detail: str

    def __str__(self) -> str:
        where = self.shard if self.key is None else f"{self.shard} [{self.key}]"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class ShardSummary:
    path: str
    samples: int
    """Samples read; up to the damage for a shard that could not be read to the end."""
    readable: bool
    """False when the shard is missing or could not be read to its end."""


@dataclass
class InspectReport:
    spec: str
    manifests: list[str]
    captions_expected: bool
    shards: list[ShardSummary] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def total_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "num_shards": self.num_shards,
            "total_samples": self.total_samples,
            "ok": self.ok,
        }

    def format(self, max_problems: int | None = 50) -> str:
        """A summary line, then one line per problem (the first ``max_problems``)."""
        captions = "captions expected" if self.captions_expected else "no captions expected"
        n = len(self.problems)
        verdict = "ok" if self.ok else f"{n} problem{'s' if n > 1 else ''}"
        lines = [f"{self.num_shards} shards, {self.total_samples} samples ({captions}): {verdict}"]
        shown = self.problems if max_problems is None else self.problems[:max_problems]
        lines += [f"  {problem}" for problem in shown]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more (--json lists all)")
        return "\n".join(lines)


@dataclass
class _ShardScan:
    """What reading one tar found; missing captions are kept apart until the set as a
    whole tells whether captions are expected."""

    path: str
    image_size: int = DEFAULT_IMAGE_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    samples: int = 0
    readable: bool = True
    captioned: int = 0
    uncaptioned_keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, key: str | None, kind: str, detail: str) -> None:
        self.problems.append(Problem(self.path, key, kind, detail))

    def check_sample(self, key: str, members: dict[str, bytes | None]) -> None:
        """``members``: data by extension, None for a member over the byte cap."""
        self.samples += 1
        if None in members.values():
            # Reported as it was met (oversized_member); the loader skips the sample.
            if not any(ext in CAPTION_EXTENSIONS for ext in members):
                self.uncaptioned_keys.append(key)
            return
        images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
        if not images:
            found = ", ".join(sorted(members)) or "nothing"
            self.problem(key, "missing_image", f"no image member (has {found})")
        for ext in images:
            error = _decode_error(members[ext], self.image_size, self.max_pixels)
            if error is not None:
                self.problem(key, error[0], f"{key}.{ext}: {error[1]}")
        caption_ext = next((ext for ext in members if ext in CAPTION_EXTENSIONS), None)
        if caption_ext is None:
            self.uncaptioned_keys.append(key)
            return
        self.captioned += 1
        try:
            caption = members[caption_ext].decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problem(key, "bad_caption", f"{key}.{caption_ext} is not UTF-8: {exc}")
            return
        if not caption.strip():
            self.problem(key, "empty_caption", f"{key}.{caption_ext} is empty")


def _decode_error(data: bytes, image_size: int, max_pixels: int) -> tuple[str, str] | None:
    """(problem kind, detail) when the loader would skip the image, else None."""
    from megabatch.data_pipeline.image_decode import CorruptImage, OversizedImage, decode_rgb

    try:
        decode_rgb(data, image_size, max_pixels)
    except OversizedImage as exc:
        return "oversized_image", f"{exc} (max_pixels)"
    except CorruptImage as exc:
        return "corrupt_image", str(exc)
    return None


def _has_end_marker(tar: tarfile.TarFile) -> bool:
    """Is the archive's end-of-archive marker (a zero block) where the members end?
    tarfile stops quietly at a file cut exactly between members; this catches that."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(TAR_BLOCK)
    return len(block) == TAR_BLOCK and not any(block)


def scan_shard(
    path: Path,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> _ShardScan:
    """Read one tar (plain or compressed) to its end, checking each sample as its
    members complete; members over ``max_member_bytes`` are seeked past, unread."""
    import tarfile

    scan = _ShardScan(str(path), image_size, max_pixels)
    try:
        file = open(path, "rb")
    except OSError as exc:
        scan.readable = False
        scan.problem(None, "unreadable_tar", f"cannot open: {exc}")
        return scan
    try:
        tar = tarfile.open(fileobj=plain_stream(file), mode="r:",
                           tarinfo=capped_tarinfo(max_member_bytes))  # fmt: skip
    except READ_ERRORS as exc:
        file.close()
        scan.readable = False
        scan.problem(None, "unreadable_tar", f"cannot open: {exc}")
        return scan
    with file, tar:
        # Members of one sample are consecutive (WebDataset's rule): collect them until
        # the key changes, then check the sample.
        key: str | None = None
        members: dict[str, bytes | None] = {}
        reading: str | None = None
        try:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue  # no extension: not part of any sample
                member_key, ext = parts
                reading = member_key
                if member_key != key:
                    if key is not None:
                        scan.check_sample(key, members)
                    key, members = member_key, {}
                if ext in members:
                    scan.problem(key, "duplicate_member", f"{member.name} appears twice")
                    continue
                if member.size > max_member_bytes:
                    members[ext] = None
                    scan.problem(key, "oversized_member", f"{member.name} is {member.size} "
                                 f"bytes, over the cap of {max_member_bytes} (max_member_bytes)")  # fmt: skip
                    continue
                members[ext] = tar.extractfile(member).read()
            complete = _has_end_marker(tar)
        except READ_ERRORS as exc:
            # The sample being read is incomplete: it is reported, not checked.
            scan.readable = False
            scan.problem(reading, "unreadable_tar", f"truncated or corrupt: {exc}")
            return scan
        if key is not None:
            scan.check_sample(key, members)
        if not complete:
            scan.readable = False
            scan.problem(None, "unreadable_tar", f"truncated: no end-of-archive marker after {key}")
    return scan


def inspect_shards(
    spec: ShardSpec,
    captions: bool | None = None,
    show_progress: bool | None = None,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> InspectReport:
    """Check every shard of ``spec`` (see ``resolve_shards``). ``captions``: whether
    every sample must have one; None: as the manifest says, else whether any sample of
    the set has one. ``show_progress``: a bar over shards; None: when on a terminal.
    ``image_size``, ``max_pixels``, ``max_member_bytes``: the loader's (its
    ``ImageConfig`` load side and pixel cap, its ``LoaderConfig`` member cap), so that
    what is reported is what the loader would skip."""
    from tqdm import tqdm

    from megabatch.data_pipeline.limits import check_cap

    for name, value in (("image_size", image_size), ("max_pixels", max_pixels),
                        ("max_member_bytes", max_member_bytes)):  # fmt: skip
        check_cap(name, value)
    shard_set = resolve_shards(spec)
    scans: list[_ShardScan] = []
    for path, expected in tqdm(
        list(zip(shard_set.paths, shard_set.expected_samples, strict=True)),
        unit="shard",
        disable=None if show_progress is None else not show_progress,
    ):
        if not path.is_file():
            scan = _ShardScan(str(path), readable=False)
            scan.problem(None, "missing_shard", "file not found")
        else:
            scan = scan_shard(path, image_size, max_pixels, max_member_bytes)
            if scan.readable and expected is not None and scan.samples != expected:
                scan.problem(
                    None, "sample_count", f"{scan.samples} samples, the manifest says {expected}"
                )
        scans.append(scan)

    if captions is None:
        captions = (
            shard_set.has_captions
            if shard_set.has_captions is not None
            else any(scan.captioned for scan in scans)
        )
    report = InspectReport(
        spec=spec_text(spec),
        manifests=[str(manifest) for manifest in shard_set.manifests],
        captions_expected=captions,
    )
    for scan in scans:
        report.shards.append(ShardSummary(scan.path, scan.samples, scan.readable))
        report.problems += scan.problems
        if captions:
            report.problems += [
                Problem(scan.path, key, "missing_caption", "no caption (.txt) member")
                for key in scan.uncaptioned_keys
            ]
    return report


def spec_text(spec: ShardSpec) -> str:
    if isinstance(spec, str | os.PathLike):
        return os.fspath(spec)
    return " ".join(os.fspath(item) for item in spec)
