"""Everything ``megabatch train`` and ``megabatch eval`` can check before any process group
starts, so that a mistake is one line (exit 2) instead of a traceback after the ranks and
the model are built: the config's values, the model preset against the task, the
tokenizer file, the shard specifications, and the checkpoint to resume with the changes
the config may make to it (trainer.resume).
"""

from __future__ import annotations

from pathlib import Path

from megabatch.trainer.config import ConfigError, RunConfig
from megabatch.trainer.resume import ResumePlan, plan_resume


def check_run(config: RunConfig, world_size: int, for_eval: bool = False) -> ResumePlan:
    """Raise ConfigError (one line naming the key or file) for anything that would fail
    later; returns which checkpoint to resume from."""
    config.validate(world_size)
    if not for_eval and config.data.train is None:
        raise ConfigError("data.train is required: the training shards")
    vocab_size = _check_tokenizer(config)
    _check_model(config, vocab_size)
    for key in ("data.train", "data.val"):
        spec = getattr(config.data, key.split(".")[1])
        if spec is not None:
            _check_shards(key, spec)
    return plan_resume(config, world_size, for_eval=for_eval)


def _check_tokenizer(config: RunConfig) -> int:
    if config.task != "clip" or config.data.tokenizer is None:
        return 1
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer

    path = Path(config.data.tokenizer)
    try:
        return CaptionTokenizer.load(path, config.model.context_length).vocab_size
    except FileNotFoundError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"data.tokenizer: cannot load {path}: {first}") from None


def _check_model(config: RunConfig, vocab_size: int) -> None:
    m = config.model
    try:
        if config.task == "clip":
            from megabatch.trainer.models.clip import clip_config

            clip_config(m.preset, image_size=m.image_size, context_length=m.context_length,
                        vocab_size=vocab_size, pad_id=0, sot_id=0, eot_id=0,
                        embed_dim=m.embed_dim)  # fmt: skip
        else:
            from megabatch.trainer.models.simclr import encoder_config

            encoder_config(m.preset, m.image_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_shards(key: str, spec) -> None:
    from megabatch.data_pipeline.errors import DataError
    from megabatch.data_pipeline.shard_specs import resolve_sources

    try:
        resolve_sources(spec)
    except DataError as exc:
        raise ConfigError(f"{key}: {exc}") from None
