"""Everything ``megabatch train`` and ``megabatch eval`` can check before any process group
starts, so that a mistake is one line (exit 2) instead of a traceback after the ranks and
the model are built: the config's values, the model preset against the task, the
tokenizer file, the shard specifications, and the checkpoint to resume with the changes
the config may make to it (trainer.resume).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.trainer.config import ConfigError, RunConfig
from megabatch.trainer.data import load_tokenizer
from megabatch.trainer.losses import check_loss
from megabatch.trainer.resume import ResumePlan, plan_resume
from megabatch.trainer.tasks import TASKS


@dataclass(frozen=True)
class CheckedRun:
    resume: ResumePlan
    """Which checkpoint to resume from, and what the config changes in it."""
    tokenizer: CaptionTokenizer | None
    """The caption tokenizer, loaded here once (None for a task without captions): the
    trainer hands it to the task, the loader and evaluation."""


def check_run(config: RunConfig, world_size: int, for_eval: bool = False) -> CheckedRun:
    """Raise ConfigError (one line naming the key or file) for anything that would fail
    later; returns what the run goes on with."""
    tokenizer = check_config(config, world_size, for_eval)
    for key in ("data.train", "data.val"):
        spec = getattr(config.data, key.split(".")[1])
        if spec is not None:
            _check_shards(key, spec)
    return CheckedRun(plan_resume(config, world_size, for_eval=for_eval), tokenizer)


def check_config(config: RunConfig, world_size: int, for_eval: bool = False,
                 tokenizer_optional: bool = False) -> CaptionTokenizer | None:  # fmt: skip
    """The checks that read no shard and no run directory: the config's values, the batch
    arithmetic for ``world_size`` ranks, the model preset against the task and its
    tokenizer (loaded: returned). ``tokenizer_optional``: a tokenizer file that is not
    there is not an error (a Kubernetes submission, whose pods see other files than the
    submitting machine); the model is then checked without its vocabulary."""
    config.validate(world_size)
    check_loss(config)
    if not for_eval and config.data.train is None:
        raise ConfigError("data.train is required: the training shards")
    task = TASKS[config.task]
    tokenizer = None
    if task.captions and not (tokenizer_optional and not _is_file(config.data.tokenizer)):
        tokenizer = load_tokenizer(config)
    try:  # the vocabulary's size only sizes the embedding: any size checks the rest
        task.check_model(config, tokenizer.vocab_size if tokenizer is not None else 1)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return tokenizer


def _is_file(path: str | None) -> bool:
    return path is not None and Path(path).is_file()


def _check_shards(key: str, spec) -> None:
    from megabatch.data_pipeline.errors import DataError
    from megabatch.data_pipeline.shard_specs import resolve_sources

    try:
        resolve_sources(spec)
    except DataError as exc:
        raise ConfigError(f"{key}: {exc}") from None
