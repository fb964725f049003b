"""``megabatch data write``, ``megabatch data inspect`` and ``megabatch data tokenizer``.

Heavy imports (PIL, scikit-learn, pyarrow) happen inside the commands, so that the rest
of the ``megabatch`` command line stays quick to start.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.limits import DEFAULT_MAX_MEMBER_BYTES, DEFAULT_MAX_PIXELS

SOURCES = ("demo", "folder", "table", "images")
_DEFAULT_IMAGE_COLUMN = "image"
_DEFAULT_CAPTION_COLUMN = "caption"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmgt])(i)?)?b?\s*$", re.IGNORECASE)


def _byte_size(text: str) -> int:
    """``"256000000"``, ``"256M"`` or ``"256MB"`` (powers of 1000), ``"256MiB"`` (1024)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1000000, 500M, 1GiB)")
    number, prefix, binary = int(match.group(1)), (match.group(2) or "").lower(), match.group(3)
    if not prefix:
        return number
    return number * (1024 if binary else 1000) ** " kmgt".index(prefix)


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data write`` and ``data inspect`` under the ``megabatch`` parser."""
    data = subparsers.add_parser(
        "data",
        help="write and check WebDataset shards",
        description="Write WebDataset shards from images and captions, and check shards.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    write = commands.add_parser(
        "write",
        help="write shards (KEY.jpg, KEY.txt, KEY.json) and a manifest",
        description=(
            "Write WebDataset tar shards and manifest.json into --out. Rerunning the same "
            "command after an interruption keeps the complete shards and finishes the rest."
        ),
    )
    write.add_argument(
        "--from",
        dest="source",
        choices=SOURCES,
        required=True,
        help="demo: scikit-learn digits (train/ and val/); folder: images with x.txt "
        "captions; table: CSV/TSV/JSONL/parquet of image paths and captions; images: "
        "images without captions (SimCLR)",
    )
    write.add_argument("--input", type=Path, help="the folder or table (not for --from demo)")
    write.add_argument("--out", type=Path, required=True, help="output folder")
    write.add_argument(
        "--image-column",
        help=f"table column with image paths (default {_DEFAULT_IMAGE_COLUMN!r})",
    )
    write.add_argument(
        "--caption-column",
        help=f"table column with captions (default {_DEFAULT_CAPTION_COLUMN!r})",
    )
    write.add_argument(
        "--max-samples-per-shard",
        type=int,
        default=10_000,
        help="samples per shard at most (default 10000; 0: no limit)",
    )
    write.add_argument(
        "--max-bytes-per-shard",
        type=_byte_size,
        help="bytes per shard at most, e.g. 500M or 1GiB (default: no limit)",
    )
    write.add_argument(
        "--jpeg-quality",
        type=int,
        default=95,
        help="quality of re-encoded images; JPEG input is copied (default 95)",
    )
    write.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="skip, without decoding, an image whose header says it has more pixels "
        f"(default {DEFAULT_MAX_PIXELS} = 8192 x 8192)",
    )
    write.add_argument("--image-size", type=int, default=48, help="demo image side (default 48)")
    write.add_argument(
        "--val-fraction", type=float, default=0.2, help="demo validation share (default 0.2)"
    )
    write.add_argument("--seed", type=int, default=0, help="demo split and captions (default 0)")
    write.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    write.set_defaults(func=_cmd_write)

    inspect = commands.add_parser(
        "inspect",
        help="count and check shards; exit status 1 if anything is wrong",
        description=(
            "Count shards and samples, decode every image as the loader does and report "
            "corrupt or oversized images, oversized or missing members, bad captions and "
            "truncated tars, by shard and key. Exit status 0 when "
            "all is well, 1 when problems were found, 2 when SPEC names nothing."
        ),
    )
    inspect.add_argument(
        "spec",
        nargs="+",
        metavar="SPEC",
        help="a folder (its manifest.json, else its *.tar), a manifest file, a brace "
        "pattern like 'data/{00000..00009}.tar' (quoted), or a tar path; several SPECs "
        "are checked as one set",
    )
    inspect.add_argument(
        "--captions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require a caption per sample (default: as the manifest says, else if any "
        "sample has one)",
    )
    inspect.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="the side the loader decodes to (ImageConfig load_size, else size): JPEGs "
        "decode at the reduced scale it allows, as in the loader (default 224)",
    )
    inspect.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="report images that would decode to more pixels, as the loader skips them "
        f"(ImageConfig.max_pixels; default {DEFAULT_MAX_PIXELS})",
    )
    inspect.add_argument(
        "--max-member-bytes",
        type=_byte_size,
        default=DEFAULT_MAX_MEMBER_BYTES,
        help="report tar members over this size, e.g. 64MiB, as the loader skips their "
        "samples (LoaderConfig.max_member_bytes; default 64MiB)",
    )
    inspect.add_argument("--json", action="store_true", help="print the full report as JSON")
    inspect.add_argument(
        "--max-problems", type=int, default=50, help="problems listed in the text report"
    )
    inspect.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    inspect.set_defaults(func=_cmd_inspect)
    _add_tokenizer_command(commands)


def _fail(command: str, message: str) -> int:
    print(f"megabatch data {command}: error: {message}", file=sys.stderr)
    return 2


def _build_source(args: argparse.Namespace):
    """The writer source the arguments name; DataError for a bad combination."""
    from megabatch.data_pipeline.write.sources import ImageFolderSource, TableSource

    if args.input is None:
        raise DataError(f"--input is required with --from {args.source}")
    if args.source == "folder":
        return ImageFolderSource(args.input, captions=True)
    if args.source == "images":
        return ImageFolderSource(args.input, captions=False)
    return TableSource(
        args.input,
        image_column=args.image_column or _DEFAULT_IMAGE_COLUMN,
        caption_column=args.caption_column or _DEFAULT_CAPTION_COLUMN,
    )


def _cmd_write(args: argparse.Namespace) -> int:
    from megabatch.data_pipeline.write.writer import ShardOptions, write_shards

    options = ShardOptions(
        max_samples_per_shard=args.max_samples_per_shard or None,
        max_bytes_per_shard=args.max_bytes_per_shard,
        jpeg_quality=args.jpeg_quality,
        show_progress=args.progress,
        max_pixels=args.max_pixels,
    )
    try:
        options.validate()
        if args.source != "table":
            for flag, value in (
                ("--image-column", args.image_column),
                ("--caption-column", args.caption_column),
            ):
                if value is not None:
                    raise DataError(f"{flag} only applies to --from table")
        if args.source == "demo":
            from megabatch.data_pipeline.write.demo import DemoOptions, write_demo

            if args.input is not None:
                raise DataError("--input does not apply to --from demo")
            demo = DemoOptions(args.image_size, args.val_fraction, args.seed)
            results = list(write_demo(args.out, demo, options).values())
        else:
            # The source is listed and checked before the output folder is touched.
            source = _build_source(args)
            results = [write_shards(source, args.out, options)]
    except DataError as exc:
        return _fail("write", str(exc))
    except OSError as exc:
        # Disk full, permissions... mid-write: complete shards are kept for a rerun.
        print(
            f"megabatch data write: error: {exc}; rerun the same command to resume",
            file=sys.stderr,
        )
        return 1

    for result in results:
        where = result.out_dir
        line = f"{where}: {result.total_samples} samples in {len(result.manifest['shards'])} shards"
        if result.already_complete:
            line += " (already complete, nothing written)"
        elif result.shards_kept:
            line += f" ({result.shards_kept} kept from an interrupted run)"
        print(line)
        if result.skipped:
            first = result.skipped[0]
            print(
                f"{where}: skipped {len(result.skipped)} unreadable samples (listed in "
                f"manifest.json), e.g. {first['source']}: {first['reason']}",
                file=sys.stderr,
            )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from megabatch.data_pipeline.write.inspect_shards import inspect_shards

    try:
        report = inspect_shards(
            args.spec,
            captions=args.captions,
            show_progress=args.progress,
            image_size=args.image_size,
            max_pixels=args.max_pixels,
            max_member_bytes=args.max_member_bytes,
        )
    except DataError as exc:
        return _fail("inspect", str(exc))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(max_problems=args.max_problems))
    return 0 if report.ok else 1


def _add_tokenizer_command(commands: argparse._SubParsersAction) -> None:
    tokenizer = commands.add_parser(
        "tokenizer",
        help="train the caption tokenizer (byte-level BPE) on the shards' captions",
        description=(
            "Learn a lower-cased byte-level BPE vocabulary from every caption of SPEC and "
            "save it as tokenizer.json (loads with CaptionTokenizer or transformers' "
            "PreTrainedTokenizerFast). Captions are encoded to a fixed context with start "
            "and end tokens."
        ),
    )
    tokenizer.add_argument("spec", nargs="+", metavar="SPEC", help="shards, as for inspect")
    tokenizer.add_argument("--out", type=Path, required=True, help="tokenizer.json to write")
    tokenizer.add_argument("--vocab-size", type=int, default=8192, help="(default 8192)")
    tokenizer.add_argument(
        "--min-frequency", type=int, default=2, help="merges seen fewer times are not learnt"
    )
    tokenizer.set_defaults(func=_cmd_tokenizer)


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer, captions_from_shards

    if args.vocab_size < 300:
        return _fail(
            "tokenizer",
            f"--vocab-size must be at least 300 (256 bytes + specials), got {args.vocab_size}",
        )
    if not args.out.parent.is_dir():
        return _fail("tokenizer", f"no such folder for --out: {args.out.parent}")
    spec = args.spec[0] if len(args.spec) == 1 else args.spec
    try:
        captions = list(captions_from_shards(spec))
        if not captions:
            return _fail("tokenizer", f"no captions in {' '.join(args.spec)}")
        tok = CaptionTokenizer.train(captions, args.vocab_size, min_frequency=args.min_frequency)
    except DataError as exc:
        return _fail("tokenizer", str(exc))
    tok.save(args.out)
    print(f"{args.out}: vocabulary of {tok.vocab_size} from {len(captions)} captions")
    return 0
