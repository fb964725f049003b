"""Where samples come from: a folder of images with sidecar captions, a table (CSV, TSV,
JSONL or parquet) of image paths and captions, a folder of images alone (SimCLR), or the
built-in demo (``megabatch.data_pipeline.write.demo``).

Every source is listed and checked when it is built, before anything is written: a
missing folder or table, an unknown column, a listed image that does not exist, an image
without its caption file or a source with no images at all raise ``DataError``. So a bad
source fails at once and leaves nothing behind. Problems that can only be seen by reading
a sample (an image that does not decode, an empty caption) are the writer's: it skips
that sample, counts it and lists it in the manifest.
"""

import codecs
import csv
import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megabatch.data_pipeline.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

# Image files a folder source picks up (lower-cased suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
# How many offending names an error message quotes.
_QUOTED = 3


@dataclass(frozen=True)
class SourceSample:
    """One sample as a source hands it to the writer."""

    id: str
    """Where the sample came from (a path relative to the source, or a demo index);
    written to the shard's JSON as ``source``."""
    image: "bytes | Image.Image"
    """The image file's bytes (JPEG bytes are copied into the shard unchanged) or a
    decoded PIL image (encoded to JPEG)."""
    caption: str | None
    """None for image-only sources."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Extra JSON-serialisable fields for the sample's ``.json`` (the demo's label)."""


class SampleError(Exception):
    """One sample could not be read (an unreadable caption file, say): the writer skips
    it and records the reason, like an image that does not decode."""


class SampleSource(ABC):
    """Where the writer's samples come from: a fixed, ordered list of samples. Sample
    ``i`` is always the same sample, which is what lets an interrupted write resume: see
    ``megabatch.data_pipeline.write.writer``."""

    description: str
    """One line for the manifest and for messages, e.g. ``folder /data/pets (1200 images
    with captions)``."""
    has_captions: bool

    @abstractmethod
    def ids(self) -> Sequence[str]:
        """Every sample's id, in order."""

    @abstractmethod
    def load(self, index: int) -> SourceSample:
        """Read sample ``index``; raises ``SampleError`` when that sample is unreadable."""

    def __len__(self) -> int:
        return len(self.ids())

    def __iter__(self) -> Iterator[SourceSample]:
        for index in range(len(self)):
            yield self.load(index)

    def digest(self) -> str:
        """A hash of the ordered sample list: a rerun resumes an interrupted write only
        if it is unchanged. It covers names and order, not file contents."""
        h = hashlib.sha256()
        for sample_id in self.ids():
            h.update(sample_id.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        return h.hexdigest()


def _quote(items: Sequence[object]) -> str:
    shown = ", ".join(str(item) for item in items[:_QUOTED])
    return shown + (", ..." if len(items) > _QUOTED else "")


# SampleError messages become skip reasons in the manifest: no paths in them (the sample's
# id, listed beside the reason, says which file), so that they are the same every run.
def _read_caption_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SampleError(f"caption file {path.name} is not UTF-8: {exc.reason} at byte "
                          f"{exc.start}") from exc  # fmt: skip
    except OSError as exc:
        raise SampleError(f"cannot read caption file {path.name}: {exc.strerror or exc}") from exc


def _read_image_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SampleError(f"cannot read image file {path.name}: {exc.strerror or exc}") from exc


class ImageFolderSource(SampleSource):
    """Every ``.jpg``/``.jpeg``/``.png``/``.webp`` under ``root`` (recursively, sorted by
    relative path; hidden files and folders are left out). With ``captions=True`` each
    image needs a sidecar caption ``<same name>.txt`` (``cat.jpg`` + ``cat.txt``);
    without, ``.txt`` files are ignored (SimCLR data)."""

    def __init__(self, root: Path, captions: bool = True):
        root = Path(root)
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DataError(f"input folder {root} {what}")
        self.root = root
        self.has_captions = captions
        self._paths = sorted(
            (
                path
                for path in root.rglob("*")
                if path.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in path.relative_to(root).parts)
                and path.is_file()
            ),
            key=lambda path: path.relative_to(root).as_posix(),
        )
        if not self._paths:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")
        if captions:
            missing = [p.relative_to(root) for p in self._paths if not _caption_path(p).is_file()]
            if missing:
                raise DataError(
                    f"{len(missing)} of {len(self._paths)} images in {root} have no caption "
                    f"file (<image name>.txt): {_quote(missing)}"
                )
        self._ids = [path.relative_to(root).as_posix() for path in self._paths]
        kind = "images with captions" if captions else "images, no captions"
        self.description = f"folder {root.resolve()} ({len(self._paths)} {kind})"

    def ids(self) -> Sequence[str]:
        return self._ids

    def load(self, index: int) -> SourceSample:
        path = self._paths[index]
        caption = _read_caption_file(_caption_path(path)) if self.has_captions else None
        return SourceSample(self._ids[index], _read_image_file(path), caption)


def _caption_path(image_path: Path) -> Path:
    return image_path.with_suffix(".txt")


class TableSource(SampleSource):
    """Rows of a CSV, TSV, JSONL or parquet table: ``image_column`` holds an image path
    (relative paths are resolved against the table's folder), ``caption_column`` the
    caption (``None``: no captions). Every listed image must exist."""

    def __init__(
        self, table: Path, image_column: str = "image", caption_column: str | None = "caption"
    ):
        table = Path(table)
        if not table.is_file():
            what = "is not a file" if table.exists() else "does not exist"
            raise DataError(f"input table {table} {what}")
        suffix = table.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise DataError(
                f"input table {table}: unknown format {suffix or '(no suffix)'}; "
                f"expected one of {', '.join(TABLE_SUFFIXES)}"
            )
        wanted = [image_column] + ([caption_column] if caption_column else [])
        columns, rows = _read_table(table, suffix, wanted)
        for name in wanted:
            if name not in columns:
                raise DataError(
                    f"column {name!r} not found in {table}; its columns are: "
                    f"{', '.join(repr(c) for c in columns) or '(none)'}"
                )
        if not rows:
            raise DataError(f"input table {table} has no rows")

        self.has_captions = caption_column is not None
        self._ids: list[str] = []
        self._paths: list[Path] = []
        self._captions: list[str | None] = []
        no_path, urls, missing = [], [], []
        for row_number, row in enumerate(rows):
            value = row.get(image_column)
            if value is None or not str(value).strip():
                no_path.append(row_number)
                continue
            value = str(value).strip()
            if "://" in value:
                urls.append(value)
                continue
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = table.parent / path
            if not path.is_file():
                missing.append(value)
            self._ids.append(value)
            self._paths.append(path)
            # A missing caption value becomes "", which the writer skips and counts.
            caption = row.get(caption_column) if caption_column else None
            self._captions.append(None if caption_column is None else _cell_text(caption))
        if no_path:
            raise DataError(
                f"{len(no_path)} rows of {table} have no value in column {image_column!r} "
                f"(rows {_quote(no_path)}, counting from 0)"
            )
        if urls:
            raise DataError(
                f"column {image_column!r} of {table} holds URLs ({_quote(urls)}); download "
                "them first (img2dataset writes shards this project reads directly)"
            )
        if missing:
            raise DataError(
                f"{len(missing)} of {len(rows)} images listed in {table} do not exist: "
                f"{_quote(missing)}"
            )
        kind = f"caption column {caption_column!r}" if caption_column else "no captions"
        self.description = (
            f"table {table.resolve()} ({len(rows)} rows, image column {image_column!r}, {kind})"
        )

    def ids(self) -> Sequence[str]:
        return self._ids

    def digest(self) -> str:
        # The captions are in memory already: cover them too.
        h = hashlib.sha256(super().digest().encode())
        for caption in self._captions:
            h.update(b"\1" if caption is None else caption.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        return h.hexdigest()

    def load(self, index: int) -> SourceSample:
        image = _read_image_file(self._paths[index])
        return SourceSample(self._ids[index], image, self._captions[index], {"row": index})


def _cell_text(value: object) -> str:
    # csv gives "" for an empty cell, JSON and parquet give None; a float NaN is what
    # pandas writes for a missing value.
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _read_table(
    table: Path, suffix: str, wanted: Sequence[str]
) -> tuple[list[str], list[dict[str, Any]]]:
    """(column names, rows as dicts) of a table, reading only ``wanted`` where the format
    allows it."""
    if suffix in (".csv", ".tsv"):
        text = _utf8_text(table, _read_table_bytes(table))
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""),
                                    delimiter="\t" if suffix == ".tsv" else ",")  # fmt: skip
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        except csv.Error as exc:
            raise DataError(f"cannot read {table} as {suffix[1:].upper()}: {exc}") from exc
        return columns, rows

    if suffix in (".jsonl", ".ndjson"):
        seen: dict[str, None] = {}  # an insertion-ordered set of the keys met
        rows = []
        with open(table, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                line = _utf8_line(table, line_number, raw)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{table}:{line_number}: not valid JSON: {exc.msg}") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{table}:{line_number}: expected a JSON object per line")
                seen.update(dict.fromkeys(row))
                rows.append(row)
        return list(seen), rows

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(table)
        columns = list(parquet.schema_arrow.names)
        present = [name for name in wanted if name in columns]
        data = parquet.read(columns=present).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {table} as parquet: {exc}") from exc
    return columns, data


def _read_table_bytes(table: Path) -> bytes:
    try:
        return table.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {table}: {exc.strerror or exc}") from exc


def _utf8_text(table: Path, data: bytes) -> str:
    """A whole table's text (a UTF-8 byte-order mark dropped, as Excel writes one);
    DataError naming the line of the first byte that is not UTF-8."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1)
        raise DataError(f"{table}:{line}: not UTF-8 ({exc.reason} at byte {column} of the "
                        "line); save the table as UTF-8") from None  # fmt: skip


def _utf8_line(table: Path, line_number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{table}:{line_number}: not UTF-8 ({exc.reason} at byte {exc.start} "
                        "of the line); save the table as UTF-8") from None  # fmt: skip
