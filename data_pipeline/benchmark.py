"""Input pipeline throughput: samples per second, per stage and worker count.

    python -m megabatch.data_pipeline.benchmark            # builds 256 x 256 demo shards if missing

Stages, each an endless stream over the demo's training shards in DataLoader worker
processes (one DataLoader per row, so worker start-up is not timed), measured for at
least --seconds after a warm-up:
- read:         tar bytes to raw samples (no image work)
- decode:       + the loader's decoding of every image to RGB at --load-size, nothing
                kept: PIL to an RGB image (``transforms.decode_image``), or simplejpeg
                into a scratch array where the loader would use it (``--decoder``)
- clip:         the training pipeline: decode into the batch, tokenize, metadata, and
                hand the batch to the main process; images stay at the shards' side
                (--load-size) and the device resizes them
- clip-resize:  the same with the workers resizing to --crop (PIL, antialiased bilinear)
- simclr:       the SimCLR workers' part: decode and centre square into the batch, and
                hand the batch to the main process
- simclr-views: + SimCLR's two augmented views of each batch (kornia), in the main
                process: on its CPU here, sharing the cores with the workers, where a
                real run makes them on the training device
The read and decode stages hand the main process one count per batch; the others hand
it whole batches (images in shared memory, tokens, keys, metadata). Every row is
measured --repeat times, in rounds over all rows (so a burst of other load on the
machine hits every stage alike), and the table gives each row's median and its runs.
Prints a table and writes docs/benchmarks-data.md (keeping its hand-made "Measurements"
section). Targets: clip at least 85% of decode
per worker, and 2 workers at least 1.7x one worker.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.shard_plan import Slot, epoch_share
from megabatch.data_pipeline.read.shard_stream import RateLimitedWarnings, source_samples
from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.data_pipeline.read.transforms import (
    DECODERS,
    ImageConfig,
    decode_image,
    jpeg_into,
    simplejpeg,
)
from megabatch.data_pipeline.shard_format import IMAGE_EXTENSIONS
from megabatch.data_pipeline.shard_specs import resolve_sources

STAGES = ("read", "decode", "clip", "clip-resize", "simclr", "simclr-views")
# The output's last section, from this heading on, is kept when the table is rewritten:
# measurements that the modules' comments cite, made by hand.
NOTES_HEADING = "## Measurements"


class _RawStage(IterableDataset):
    """read / decode stages: this worker's share of the shards, counted per chunk."""

    def __init__(self, spec, decode: bool, chunk: int, image: ImageConfig | None = None):
        super().__init__()
        self.spec, self.decode, self.chunk, self.image = spec, decode, chunk, image

    def __iter__(self):
        info = get_worker_info()
        slot = Slot(0, 1, info.id if info else 0, info.num_workers if info else 1)
        (source,) = resolve_sources(self.spec)
        epoch = 0
        while True:  # endless: epochs back to back
            share = epoch_share(len(source.urls), 0, epoch, slot)
            yield from self._counts(source, share)
            epoch += 1

    def _counts(self, source, share):
        samples = source_samples(source, share.shards, share.stride, share.offset, 0,
                                 RateLimitedWarnings(), Counter())  # fmt: skip
        n = 0
        side = (self.image.load_size or self.image.size) if self.decode else 0
        scratch = np.empty((side, side, 3), dtype=np.uint8)
        for sample in samples:
            if self.decode:  # what the loader's decode_into does, less writing the batch
                data = sample[next(e for e in sample if e in IMAGE_EXTENSIONS)]
                if self.image.decoder == "pil" or not jpeg_into(data, scratch):
                    decode_image(data, side)
            n += 1
            if n == self.chunk:
                yield n
                n = 0
        if n:
            yield n


def _rate(batches, min_seconds: float, size=lambda b: b) -> float:
    """Samples per second of an endless batch iterator, after a one-second warm-up."""
    start = time.perf_counter()
    for _ in batches:  # warm-up: worker start-up, page cache
        if time.perf_counter() - start > 1.0:
            break
    samples, start = 0, time.perf_counter()
    for batch in batches:
        samples += size(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return samples / elapsed
    raise RuntimeError("stream ended")


def _image_config(stage: str, args) -> ImageConfig:
    """What a stage's workers decode to: --load-size (clip-resize: --crop)."""
    load_size = args.crop if stage == "clip-resize" else args.load_size
    return ImageConfig(size=args.crop, load_size=load_size, decoder=args.decoder)


def _loader_config(stage: str, workers: int, args) -> LoaderConfig:
    """The loader a clip or simclr stage times, from the benchmark's arguments: an
    endless (resampled) stream of the shards, with captions for the clip stages."""
    return LoaderConfig(shards=str(args.shards), captions=stage.startswith("clip"),
                        batch_size=args.batch_size, num_workers=workers, resampled=True,
                        image=_image_config(stage, args), pin_memory=False)  # fmt: skip


def _measure(stage: str, workers: int, args, tokenizer: CaptionTokenizer) -> float:
    if stage in ("read", "decode"):
        dataset = _RawStage(str(args.shards), stage == "decode", args.batch_size,
                            _image_config(stage, args))  # fmt: skip
        return _rate(iter(DataLoader(dataset, batch_size=None, num_workers=workers)), args.seconds)
    config = _loader_config(stage, workers, args)
    batches = iter(ShardLoader(config, tokenizer=tokenizer))
    if stage != "simclr-views":
        return _rate(batches, args.seconds, len)
    from megabatch.data_pipeline.read.views import SimCLRViews, ViewConfig

    views = SimCLRViews(ViewConfig(size=args.crop))

    def with_views():
        for i, batch in enumerate(batches):
            views(batch.images, seed=i)
            yield batch

    return _rate(with_views(), args.seconds, len)


def _ensure_demo(path: Path, image_size: int) -> Path:
    if not (path / "train" / "manifest.json").is_file():
        from megabatch.data_pipeline.write.demo import DemoOptions, write_demo
        from megabatch.data_pipeline.write.writer import ShardOptions

        print(f"writing {image_size} x {image_size} demo shards to {path}", file=sys.stderr)
        # 100 samples a shard: 15 shards, enough for every worker to read its own.
        write_demo(
            path, DemoOptions(image_size=image_size), ShardOptions(max_samples_per_shard=100)
        )
    return path / "train"


def _ensure_tokenizer(shards: Path, path: Path) -> CaptionTokenizer:
    if not path.is_file():
        from megabatch.data_pipeline.read.tokenizer import captions_from_shards

        CaptionTokenizer.train(captions_from_shards(str(shards)), vocab_size=1000).save(path)
    return CaptionTokenizer.load(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megabatch.data_pipeline.benchmark",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--shards", type=Path, default=None,
                        help="shard folder (default: demo shards built under build/bench-data)")  # fmt: skip
    parser.add_argument("--image-size", type=int, default=256, help="demo image side")
    parser.add_argument("--crop", type=int, default=224, help="training image side")
    parser.add_argument("--load-size", type=int, default=None,
                        help="side the clip stage's workers produce (default: --image-size)")  # fmt: skip
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, of {', '.join(STAGES)}")  # fmt: skip
    parser.add_argument("--decoder", choices=DECODERS, default="auto",
                        help="JPEG decoder (ImageConfig.decoder; auto: simplejpeg if installed)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0, help="minimum timed seconds per row")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over all rows (median)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-data.md"))
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stages {', '.join(sorted(unknown))}")
    if args.decoder == "simplejpeg" and simplejpeg is None:
        parser.error("--decoder simplejpeg: simplejpeg is not installed")
    decoder = "simplejpeg" if args.decoder != "pil" and simplejpeg is not None else "PIL"
    work = Path("build/bench-data")
    work.mkdir(parents=True, exist_ok=True)
    if args.shards is None:
        args.shards = _ensure_demo(work / f"demo{args.image_size}", args.image_size)
    args.load_size = args.load_size or args.image_size
    tokenizer = _ensure_tokenizer(args.shards, work / "tokenizer.json")
    torch.set_num_threads(1)  # the main process only counts; the workers do the work

    runs: dict[tuple[str, int], list[float]] = {}
    worker_counts = [int(w) for w in args.workers.split(",")]
    for round_ in range(max(1, args.repeat)):
        for stage in stages:
            for workers in worker_counts:
                rate = _measure(stage, workers, args, tokenizer)
                runs.setdefault((stage, workers), []).append(rate)
                print(f"  round {round_ + 1}: {stage:6s} {workers} workers: {rate:8.0f} "
                      f"samples/s", file=sys.stderr, flush=True)  # fmt: skip
    rates = {row: statistics.median(values) for row, values in runs.items()}

    lines = [
        "| stage | workers | samples/s (median) | vs decode | vs 1 worker | runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for (stage, workers), rate in rates.items():
        decode = rates.get(("decode", workers))
        vs_decode = f"{rate / decode:.2f}" if decode and stage not in ("read", "decode") else "-"
        one = rates.get((stage, 1))
        vs_one = f"{rate / one:.2f}x" if one and workers != 1 else "-"
        each = ", ".join(f"{r:.0f}" for r in runs[stage, workers])
        lines.append(f"| {stage} | {workers} | {rate:.0f} | {vs_decode} | {vs_one} | {each} |")
    table = "\n".join(lines)
    print(table)
    header = (
        f"# Input pipeline benchmark\n\n{dt.date.today().isoformat()}, "
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}. "
        f"Command: `python -m megabatch.data_pipeline.benchmark {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f". Shards: {args.shards}, batch {args.batch_size}, crop {args.crop}, clip workers' "
        f"side {args.load_size}, JPEG decoder {decoder}.\n\n"
    )
    tmp = args.output.with_suffix(".md.tmp")
    tmp.write_text(header + table + "\n" + _kept_notes(args.output))
    tmp.replace(args.output)
    return 0


def _kept_notes(output: Path) -> str:
    """The existing output's section from NOTES_HEADING on ("" if none), to keep."""
    try:
        text = output.read_text()
    except OSError:
        return ""
    at = text.find("\n" + NOTES_HEADING + "\n")
    return "" if at < 0 else text[at:]


if __name__ == "__main__":
    sys.exit(main())
