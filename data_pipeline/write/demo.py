"""The built-in demo dataset: scikit-learn's 1,797 handwritten digits (8x8 scans shipped
inside the package, so nothing is downloaded), upscaled to RGB images with a caption
each, split into train and validation.

``megabatch data write --from demo --out DIR`` writes::

    DIR/classnames.json   ["zero", ..., "nine"]: the labels' names, for zero-shot eval
    DIR/templates.json    zero-shot prompts, "a photo of the digit {}." ...
    DIR/train/            shards + manifest.json
    DIR/val/              shards + manifest.json

Everything is a function of ``DemoOptions``: the same options give the same bytes.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.shard_format import atomic_write_json
from megabatch.data_pipeline.write.sources import SampleSource, SourceSample
from megabatch.data_pipeline.write.writer import (
    ShardOptions,
    WriteResult,
    prepare_output_dir,
    write_shards,
)

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training captions; {word} is the class name, {numeral} the digit.
CAPTION_TEMPLATES = (
    "a photo of the digit {word}",
    "handwritten {numeral}",
    "the number {word}, written by hand",
    "a scan of a handwritten {numeral}",
    "a black and white picture of the number {numeral}",
    "the digit {word} in pen",
    "a small drawing of a {numeral}",
)
# Zero-shot prompts, filled with a class name (CLIP's prompt-ensembling format).
ZERO_SHOT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}, written by hand.",
    "a scan of the digit {}.",
)
SPLITS = ("train", "val")
# The digits are ink darkness in 0..16 (scikit-learn shows them with a reversed grey map).
_DIGITS_MAX = 16.0


@dataclass(frozen=True)
class DemoOptions:
    """How the demo dataset is built."""

    image_size: int = 48
    """Side of the square RGB images, in pixels (bicubic upscaling of the 8x8 scans).
    48: under twice the demo models' 32, so that the loader decodes the JPEGs whole (no
    reduced-scale decode) and resizes them with PIL, as the image processor of an
    exported model does: the export then sees the trainer's pixels exactly."""
    val_fraction: float = 0.2
    """Share of each class held out for validation."""
    seed: int = 0
    """Seeds the split and the choice of caption template."""

    def validate(self) -> None:
        if self.image_size < 8:
            raise DataError(f"demo image size must be at least 8, got {self.image_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"demo validation fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class DemoData:
    """The digits with their captions and split; images stay 8x8 until a sample is read."""

    options: DemoOptions
    scans: np.ndarray  # (1797, 8, 8) uint8, dark ink on white
    labels: np.ndarray  # (1797,) int
    captions: tuple[str, ...]
    split_indices: dict[str, np.ndarray]  # split -> ascending indices into scans


def load_demo(options: DemoOptions | None = None) -> DemoData:
    options = options if options is not None else DemoOptions()
    options.validate()
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = np.asarray(digits.images, dtype=np.float64) / _DIGITS_MAX
    scans = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)

    # Separate streams, so that changing how one is drawn never changes the other.
    split_rng = np.random.default_rng([options.seed, 0])
    caption_rng = np.random.default_rng([options.seed, 1])

    # Stratified: each class keeps the same share in validation.
    is_val = np.zeros(len(labels), dtype=bool)
    for label in range(len(CLASSNAMES)):
        members = np.flatnonzero(labels == label)
        n_val = int(round(options.val_fraction * len(members)))
        is_val[split_rng.permutation(members)[:n_val]] = True

    template_ids = caption_rng.integers(len(CAPTION_TEMPLATES), size=len(labels))
    captions = tuple(
        CAPTION_TEMPLATES[t].format(word=CLASSNAMES[label], numeral=label)
        for t, label in zip(template_ids.tolist(), labels.tolist(), strict=True)
    )
    return DemoData(
        options=options,
        scans=scans,
        labels=labels,
        captions=captions,
        split_indices={"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)},
    )


class DemoSource(SampleSource):
    """One split of the demo as a writer source."""

    has_captions = True

    def __init__(self, data: DemoData, split: str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data = data
        self.split = split
        self._indices = data.split_indices[split].tolist()
        self._ids = [f"digits/{i:04d}" for i in self._indices]
        o = data.options
        self.description = (
            f"demo: scikit-learn digits, {split} split ({len(self._indices)} of "
            f"{len(data.labels)}), {o.image_size}x{o.image_size} RGB, "
            f"val_fraction {o.val_fraction}, seed {o.seed}"
        )

    def ids(self) -> Sequence[str]:
        return self._ids

    def load(self, index: int) -> SourceSample:
        from PIL import Image

        i = self._indices[index]
        size = self.data.options.image_size
        image = (
            Image.fromarray(self.data.scans[i])  # uint8 (8, 8): mode "L"
            .resize((size, size), Image.Resampling.BICUBIC)
            .convert("RGB")
        )
        label = int(self.data.labels[i])
        metadata = {"label": label, "label_name": CLASSNAMES[label], "digits_index": i}
        return SourceSample(self._ids[index], image, self.data.captions[i], metadata)


def write_demo(
    out_dir: Path, demo: DemoOptions | None = None, shards: ShardOptions | None = None
) -> dict[str, WriteResult]:
    """Write the demo's ``train/`` and ``val/`` shard sets and, once both are complete,
    ``classnames.json`` and ``templates.json`` beside them. Returns {split: result}."""
    out_dir = Path(out_dir)
    demo = demo if demo is not None else DemoOptions()
    shards = shards if shards is not None else ShardOptions()
    # Options first: a bad one must not leave an output folder behind.
    demo.validate()
    shards.validate()
    prepare_output_dir(out_dir)
    data = load_demo(demo)
    results = {
        split: write_shards(DemoSource(data, split), out_dir / split, shards, split=split)
        for split in SPLITS
    }
    atomic_write_json(out_dir / "classnames.json", list(CLASSNAMES))
    atomic_write_json(out_dir / "templates.json", list(ZERO_SHOT_TEMPLATES))
    return results
