"""Check a set of WebDataset shards before training on them.

Counts shards and samples, decodes every image (``Image.open(...).convert("RGB")``, what
a data loader will do) and reports, by shard and key:

- ``missing_shard``: a shard the specification names is not there;
- ``unreadable_tar``: a tar that cannot be opened, is cut short (a member's data or the
  end-of-archive marker missing) or is otherwise corrupt;
- ``sample_count``: a shard's sample count differs from its manifest's;
- ``corrupt_image``: an image member that does not decode;
- ``missing_image``: a sample (key) with no image member;
- ``missing_caption``: a sample with no caption (``.txt``) when captions are expected:
  as the manifest says, as the caller says, or else when any sample of the set has one;
- ``empty_caption`` / ``bad_caption``: a caption that is empty or not UTF-8;
- ``duplicate_member``: the same ``KEY.ext`` twice in a row (WebDataset keeps one).

Reads any WebDataset tars, img2dataset's included: members are grouped by key the way
WebDataset groups them, and the ``_stats.json`` and ``.parquet`` files img2dataset writes
beside its tars are ignored.
"""

import io
import json
import os
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.shard_format import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    TAR_BLOCK,
    split_member_name,
)

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


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
class ShardSet:
    """A resolved shard specification."""

    paths: list[Path]
    expected_samples: list[int | None]
    """Per shard, the manifest's sample count (None without a manifest)."""
    manifests: list[Path] = field(default_factory=list)
    has_captions: bool | None = None
    """The manifests' word on captions; None without manifests or if they disagree."""


def resolve_shards(spec: ShardSpec) -> ShardSet:
    """Turn a specification into shard paths: a folder (its ``manifest.json``, or else
    every ``*.tar`` in it, sorted), a manifest file, a brace pattern
    (``data/{00000..00009}.tar``), one tar path, or a list of any of these (their shards
    in order). A folder, manifest or single path that does not exist, or a folder with no
    shards, raises ``DataError``; tars named by a pattern, list or manifest but missing
    are reported by the check."""
    if not isinstance(spec, str | os.PathLike):
        items = [os.fspath(item) for item in spec]
        if not items:
            raise DataError("no shards given")
        if len(items) == 1:
            return resolve_shards(items[0])
        parts = [
            resolve_shards(item)
            if os.path.isdir(item) or item.endswith(".json")
            else _without_counts(_expand(item))
            for item in items
        ]
        return _concat(parts)

    text = os.fspath(spec)
    if "{" in text:
        return _without_counts(_expand(text))
    path = Path(text)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _from_manifest(path / MANIFEST_NAME)
        # img2dataset's folders also hold NNNNN_stats.json and NNNNN.parquet: not shards.
        tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not tars:
            raise DataError(f"no {MANIFEST_NAME} and no .tar files in {path}")
        return _without_counts(tars)
    if not path.exists():
        raise DataError(f"no such file or folder: {path}")
    if path.suffix == ".json":
        return _from_manifest(path)
    return _without_counts([path])


def _without_counts(paths: list[Path]) -> ShardSet:
    return ShardSet(paths, [None] * len(paths))


def _concat(parts: list[ShardSet]) -> ShardSet:
    captions = {part.has_captions for part in parts}
    return ShardSet(
        paths=[path for part in parts for path in part.paths],
        expected_samples=[count for part in parts for count in part.expected_samples],
        manifests=[manifest for part in parts for manifest in part.manifests],
        has_captions=captions.pop() if len(captions) == 1 else None,
    )


def _expand(pattern: str) -> list[Path]:
    from braceexpand import braceexpand

    return [Path(item) for item in braceexpand(pattern)]


def _from_manifest(path: Path) -> ShardSet:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["shards"]
        names = [entry["name"] for entry in entries]
        counts = [entry.get("samples") for entry in entries]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{path} is not a shard manifest (no 'shards' list of names)") from None
    has_captions = manifest.get("has_captions")
    return ShardSet(
        paths=[path.parent / name for name in names],
        expected_samples=counts,
        manifests=[path],
        has_captions=has_captions if isinstance(has_captions, bool) else None,
    )


@dataclass
class _ShardScan:
    """What reading one tar found; missing captions are kept apart until the set as a
    whole tells whether captions are expected."""

    path: str
    samples: int = 0
    readable: bool = True
    captioned: int = 0
    uncaptioned_keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def problem(self, key: str | None, kind: str, detail: str) -> None:
        self.problems.append(Problem(self.path, key, kind, detail))

    def check_sample(self, key: str, members: dict[str, bytes]) -> None:
        self.samples += 1
        images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
        if not images:
            found = ", ".join(sorted(members)) or "nothing"
            self.problem(key, "missing_image", f"no image member (has {found})")
        for ext in images:
            error = _decode_error(members[ext])
            if error is not None:
                self.problem(key, "corrupt_image", f"{key}.{ext}: {error}")
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


def _decode_error(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
    except Exception as exc:  # whatever stops a decode is what this check looks for
        return f"{type(exc).__name__}: {exc}"
    return None


def _has_end_marker(tar: tarfile.TarFile) -> bool:
    """Is the archive's end-of-archive marker (a zero block) where the members end?
    tarfile stops quietly at a file cut exactly between members; this catches that."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(TAR_BLOCK)
    return len(block) == TAR_BLOCK and not any(block)


def scan_shard(path: Path) -> _ShardScan:
    """Read one tar to its end, checking each sample as its members complete."""
    scan = _ShardScan(str(path))
    try:
        tar = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        scan.readable = False
        scan.problem(None, "unreadable_tar", f"cannot open: {exc}")
        return scan
    with tar:
        # Members of one sample are consecutive (WebDataset's rule): collect them until
        # the key changes, then check the sample.
        key: str | None = None
        members: dict[str, bytes] = {}
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
                members[ext] = tar.extractfile(member).read()
            complete = _has_end_marker(tar)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
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
    spec: ShardSpec, captions: bool | None = None, show_progress: bool | None = None
) -> InspectReport:
    """Check every shard of ``spec`` (see ``resolve_shards``). ``captions``: whether
    every sample must have one; None: as the manifest says, else whether any sample of
    the set has one. ``show_progress``: a bar over shards; None: when on a terminal."""
    from tqdm import tqdm

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
            scan = scan_shard(path)
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
