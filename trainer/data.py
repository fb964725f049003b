"""What the trainer hands the data pipeline, each built from the run config in one place:
the image config (what the workers and the device do to images), the loader config for
training and for evaluation, and the caption tokenizer, loaded once per process and
handed to the task, the training loader and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megabatch.data_pipeline.read.loader import LoaderConfig
from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.data_pipeline.read.transforms import ImageConfig
from megabatch.trainer.config import ConfigError, RunConfig
from megabatch.trainer.console import first_line

# Evaluation reads each held-out sample once, in order, in the main process (rank 0 alone
# evaluates, while the other ranks wait: worker processes would only add start-up time).
EVAL_BATCH_SIZE = 256


def image_config(config: RunConfig) -> ImageConfig:
    """From the model's and the data's keys: the side images are decoded to and the
    side the model sees, the decoder, and the pixel cap."""
    return ImageConfig(size=config.model.image_size, load_size=config.data.load_size,
                       decoder=config.data.decoder, max_pixels=config.data.max_image_pixels)  # fmt: skip


def loader_config(config: RunConfig, shards: Any, *, captions: bool,
                  evaluation: bool = False) -> LoaderConfig:  # fmt: skip
    """The loader of ``shards`` (``data.train`` or ``data.val``). Training: this rank's
    micro-batches, shuffled per (seed, epoch), its last short batch dropped (every rank
    steps together on full micro-batches). Evaluation: every sample once, in order."""
    common = dict(shards=shards, captions=captions, image=image_config(config),
                  max_member_bytes=config.data.max_member_bytes)  # fmt: skip
    if evaluation:
        return LoaderConfig(**common, batch_size=EVAL_BATCH_SIZE, num_workers=0, seed=0,
                            shuffle_block=1, pin_memory=False)  # fmt: skip
    return LoaderConfig(
        **common, seed=config.seed, batch_size=config.batch.micro_batch_size,
        num_workers=config.data.num_workers, shuffle_block=config.data.shuffle_block,
        resampled=config.data.resampled, drop_last=True,
    )  # fmt: skip


def load_tokenizer(config: RunConfig) -> CaptionTokenizer:
    """``data.tokenizer`` at the model's context length; a ConfigError (one line naming
    the key and the file) when it is missing or does not load."""
    if config.data.tokenizer is None:
        raise ConfigError("data.tokenizer is required for captions (build one with "
                          "`megabatch data tokenizer`)")  # fmt: skip
    path = Path(config.data.tokenizer)
    try:
        return CaptionTokenizer.load(path, config.model.context_length)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise ConfigError(f"data.tokenizer: cannot load {path}: {first_line(exc)}") from None
