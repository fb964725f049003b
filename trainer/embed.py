"""``megabatch embed EXPORT_DIR``: embeddings of an image folder, a caption file or
WebDataset shards, from a ``megabatch export`` folder alone (docs/export.md, "Embedding
with the export").

The inputs are read and checked by ``embed_sources`` (bad images skipped and counted, as
the loader counts them), the vectors made by ``embed_models`` (the folder's processor,
tokenizer and model, through transformers or onnxruntime: none of megabatch's models),
a batch at a time, and written by ``embed_output`` to a parquet file that appears
complete or not at all: an error, Ctrl-C or SIGTERM removes the partial file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megabatch.trainer.atomic_write import PathExists, atomic_file
from megabatch.trainer.console import first_line, quiet_libraries
from megabatch.trainer.embed_models import (
    Encoder,
    Export,
    check_files,
    columns_for,
    load_encoder,
    read_export,
)
from megabatch.trainer.embed_output import SKIPPED_KEY, EmbeddingWriter
from megabatch.trainer.embed_sources import (
    SKIP_KINDS,
    EmbedError,
    Item,
    Source,
    caption_file,
    image_folder,
    shards,
    skip_summary,
)
from megabatch.trainer.stop_signals import sigterm_raises

DEFAULT_BATCH_SIZE = 64
NOUNS = {"images": "images", "captions": "captions", "shards": "samples"}


@dataclass(frozen=True)
class EmbedPlan:
    export: Export
    source: Source
    columns: tuple[str, ...]  # the vector columns, in the file's order
    out: Path
    onnx: bool
    batch_size: int
    overwrite: bool


# --------------------------------------------------------------------------- the command
def add_embed_command(commands: argparse._SubParsersAction) -> None:
    embed = commands.add_parser(
        "embed",
        help="embed images, captions or shards with an exported model, into a parquet file",
        description="Embed an image folder (--images), a caption file (--captions, CLIP "
        "only) or WebDataset shards (--shards) with a `megabatch export` folder alone: its "
        "own image processor (PIL backend) and tokenizer, its model through transformers "
        "or, with --onnx, onnxruntime. Writes FILE, a parquet file: key (string) and "
        "image_embeds / text_embeds (CLIP, unit vectors; both for shards with captions) "
        "or features (SimCLR), fixed_size_list<float32>. Images that do not decode or are "
        "too large are skipped and counted. FILE is written under a temporary name and "
        "renamed when complete. See docs/export.md. Exit status: 0 written, 2 bad input.",
    )
    embed.add_argument("export_dir", type=Path, metavar="EXPORT_DIR",
                       help="a folder written by megabatch export")  # fmt: skip
    embed.add_argument("--shards", metavar="SPEC",
                       help="WebDataset shards: a folder, manifest, brace pattern, tar or "
                       "pipe: command; key url#key, as the loader names samples")  # fmt: skip
    embed.add_argument("--images", type=Path, metavar="DIR",
                       help="every image file under DIR, recursively, sorted; key the path "
                       "relative to DIR")  # fmt: skip
    embed.add_argument("--captions", type=Path, metavar="FILE",
                       help="one caption per line (UTF-8), CLIP only; key the line number "
                       "from 1, blank lines skipped")  # fmt: skip
    embed.add_argument("--out", type=Path, metavar="FILE", help="the parquet file to write")
    embed.add_argument("--onnx", action="store_true",
                       help="run the export's model.onnx files with onnxruntime (export "
                       "with --format onnx) instead of transformers")  # fmt: skip
    embed.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                       help=f"inputs per forward pass (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    embed.add_argument("--overwrite", action="store_true",
                       help="replace FILE if it exists (else an existing FILE is refused)")  # fmt: skip
    embed.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    try:
        plan = plan_embed(args.export_dir, shards=args.shards, images=args.images,
                          captions=args.captions, out=args.out, onnx=args.onnx,
                          batch_size=args.batch_size, overwrite=args.overwrite)  # fmt: skip
        with sigterm_raises():
            rows = embed(plan)
    except EmbedError as exc:
        print(f"megabatch embed: error: {first_line(exc)}", file=sys.stderr)
        return 2
    noun = NOUNS[plan.source.kind]
    print(f"megabatch embed: embedded {rows} {noun}, skipped "
          f"{skip_summary(plan.source.skipped)}", file=sys.stderr)  # fmt: skip
    print(plan.out)
    return 0


# --------------------------------------------------------------------------- the plan
def plan_embed(export_dir: Path, *, shards: str | None = None, images: Path | None = None,
               captions: Path | None = None, out: Path | None = None, onnx: bool = False,
               batch_size: int = DEFAULT_BATCH_SIZE, overwrite: bool = False) -> EmbedPlan:  # fmt: skip
    """Every check that needs no model loaded: the options, FILE, the export's files and
    the source (read far enough to know it is not empty)."""
    given = [name for name, value in (("--shards", shards), ("--images", images),
                                      ("--captions", captions)) if value is not None]  # fmt: skip
    if len(given) != 1:
        raise EmbedError("give one of --shards, --images, --captions"
                         + (f" (got {', '.join(given)})" if given else ""))  # fmt: skip
    if batch_size < 1:
        raise EmbedError(f"--batch-size must be >= 1, got {batch_size}")
    out = _check_out(out, overwrite)
    export = read_export(Path(export_dir))
    if captions is not None and export.task != "clip":
        raise EmbedError(f"--captions needs a CLIP export: {export_dir} is a "
                         f"{export.model_type} image backbone (SimCLR)")  # fmt: skip
    source = _source(export, shards, images, captions)
    columns = columns_for(export, source.has_images, source.has_captions)
    check_files(export, columns, onnx)
    return EmbedPlan(export, source, columns, out, onnx, batch_size, overwrite)


def _check_out(out: Path | None, overwrite: bool) -> Path:
    if out is None:
        raise EmbedError("--out FILE is required (the parquet file to write)")
    if out.is_dir():
        raise EmbedError(f"--out {out} is a folder (give a file name)")
    if out.exists() and not overwrite:
        raise EmbedError(f"{out} exists (pass --overwrite to replace it)")
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise EmbedError(f"--out {out}: cannot write in {existing}")
    return out


def _source(export: Export, spec: str | None, images: Path | None,
            captions: Path | None) -> Source:  # fmt: skip
    if images is not None:
        return image_folder(images)
    if captions is not None:
        return caption_file(captions)
    return shards(spec, captions=export.task == "clip")


# --------------------------------------------------------------------------- embedding
def embed(plan: EmbedPlan) -> int:
    """Write plan.out (atomically); returns the rows written."""
    quiet_libraries()
    encoder = load_encoder(plan.export, plan.columns, plan.onnx)
    source = plan.source
    try:
        with atomic_file(plan.out, plan.overwrite) as tmp, _progress(source) as bar:
            with EmbeddingWriter(tmp, _metadata(plan, encoder)) as writer:
                for items in _chunks(source.items, plan.batch_size):
                    writer.add([item.key for item in items],
                               {c: _encode(encoder, c, items) for c in plan.columns})  # fmt: skip
                    bar.update(writer.rows + source.skipped.total() - bar.n)
                if writer.rows == 0:
                    raise EmbedError(f"nothing embedded: every input of {source.where} was "
                                     f"skipped ({skip_summary(source.skipped)})")  # fmt: skip
                writer.footer(SKIPPED_KEY, {k: source.skipped[k] for k in SKIP_KINDS})
    except PathExists as exc:  # FILE appeared while we wrote
        raise EmbedError(str(exc)) from None
    return writer.rows


def _encode(encoder: Encoder, column: str, items: list[Item]) -> np.ndarray:
    """(B, D) float32 for the batch: its images, or its captions for text_embeds."""
    inputs = [item.caption if column == "text_embeds" else item.image for item in items]
    return encoder.encode(column, inputs)


def _chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _metadata(plan: EmbedPlan, encoder: Encoder) -> dict:
    """What the schema says about the vectors (``embed_output.METADATA_KEY``); each
    column's dimension is added when the first batch is made."""
    from megabatch.trainer import __version__

    source = plan.source
    where = source.where if source.kind == "shards" else str(Path(source.where).resolve())
    return {
        "format": "megabatch-embed/1", "megabatch": __version__,
        "export_dir": str(plan.export.folder.resolve()), "task": plan.export.task,
        "model_type": plan.export.model_type, "export_step": plan.export.step,
        "source": {"kind": source.kind, "path": where},
        "backend": encoder.backend, "device": encoder.device,
        "columns": {c: {"normalized": c != "features"} for c in plan.columns},
    }  # fmt: skip


# --------------------------------------------------------------------------- progress
@contextmanager
def _progress(source: Source):
    """A tqdm bar on stderr (when it is a terminal) over the source's inputs, used or
    skipped; the skip warnings (the ``megabatch.data`` logger's) printed above it."""
    from tqdm import tqdm

    unit = {"images": "file", "captions": "caption", "shards": "sample"}[source.kind]
    logger = logging.getLogger("megabatch.data")
    handler, propagate = _TqdmWarnings(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # once: not again through a handler of the root logger
    try:
        with tqdm(total=source.total, unit=unit, desc="embed", file=sys.stderr,
                  disable=None, dynamic_ncols=True) as bar:  # fmt: skip
            yield bar
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class _TqdmWarnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"megabatch embed: warning: {record.getMessage()}", file=sys.stderr)
