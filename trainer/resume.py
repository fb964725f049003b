"""Which checkpoint a start resumes from, and what the config may change on resume.

Decided before any process group starts (file reads only): ``train.resume=auto`` takes the
newest complete checkpoint whose step had a finite loss; a path must name a complete
checkpoint. The checkpoint's meta.json holds the resolved config that wrote it, and the
new config is compared with it key by key:

- refused, each key named in one error line: what a step means or what the checkpoint's
  state is laid out for: the task, the model, the batch arithmetic (micro-batch,
  accumulation, world size), the loss, jigsaw's permutations and tiles, the data order
  (shards, seed, workers, shuffle block, resampling, tokenizer), the optimizer kind,
  ZeRO stage and precision;
- allowed, listed on the progress stream and applied from the resumed step on: the
  optimizer's hyperparameters (the peak learning rate and its schedule included: the
  config, not the checkpoint, says what they are), the step budget, evaluation, logging
  and checkpoint cadence, the loss backend;
- no effect after the first start, listed as such: ``loss.init_logit_scale`` (the scale
  is a trained parameter by then), ``preset`` (its keys are compared one by one).

``megabatch eval`` and ``megabatch export`` only need the model to be the same: task,
model, tokenizer, loss (SigLIP's model holds a logit bias), jigsaw's permutation count
(its classifier's width).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megabatch.trainer.checkpoint import (
    Checkpoint,
    CheckpointError,
    complete_checkpoints,
    read_checkpoint,
)
from megabatch.trainer.config import ConfigError, RunConfig, plain_dict

REFUSED = (
    "task", "seed", "model.", "batch.micro_batch_size", "batch.accumulation_steps",
    "loss.name", "loss.temperature", "loss.margin", "loss.max_logit_scale", "method.permutations",
    "method.normalise_each_tile", "data.train", "data.num_workers",
    "data.shuffle_block", "data.resampled", "data.tokenizer", "optim.name",
    "engine.zero_stage", "engine.precision",
)  # fmt: skip
REFUSED_FOR_EVAL = ("task", "model.", "data.tokenizer", "loss.name", "method.permutations")
NO_EFFECT = ("loss.init_logit_scale", "loss.init_logit_bias", "preset")
# Keys that differ between starts by design, or are checked elsewhere.
IGNORED = ("train.resume", "run_dir", "batch.global_batch_size")


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Checkpoint | None
    applied: list[Change] = field(default_factory=list)
    no_effect: list[Change] = field(default_factory=list)

    def describe(self) -> list[str]:
        """Progress lines for the changes (none when nothing changed)."""
        lines = [f"resume: changed from the checkpoint's config: {c}" for c in self.applied]
        lines += [f"resume: {c} has no effect after the first start" for c in self.no_effect]
        return lines


def plan_resume(config: RunConfig, world_size: int, for_eval: bool = False) -> ResumePlan:
    mode = config.train.resume
    if mode == "none":
        return ResumePlan(None)
    if mode == "auto":
        checkpoint = latest_checkpoint(Path(config.run_dir))
        if checkpoint is None:
            return ResumePlan(None)
    else:
        try:
            checkpoint = read_checkpoint(Path(mode))
        except CheckpointError as exc:
            raise ConfigError(f"train.resume: {exc}") from None
    written_by = checkpoint.meta.get("world_size")
    if not for_eval and written_by is not None and written_by != world_size:
        raise ConfigError(
            f"cannot resume {checkpoint.path} with {world_size} rank(s): it was written by "
            f"{written_by}, and the global batch and every rank's data position depend on "
            "the world size (resume with the same number of ranks, or train.resume=none)"
        )
    changes = config_changes(checkpoint, config)
    refused = refused_changes(changes, for_eval)
    if refused:
        raise ConfigError(
            f"cannot resume {checkpoint.path}: "
            + "; ".join(map(str, refused))
            + " would change what a step means or what the checkpoint holds "
            "(start a new run_dir, or put these keys back)"
        )
    kept = [c for c in changes if not _matches(c.key, IGNORED)]
    return ResumePlan(
        checkpoint,
        applied=[c for c in kept if not _matches(c.key, NO_EFFECT)],
        no_effect=[c for c in kept if _matches(c.key, NO_EFFECT)],
    )


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of ``run_dir`` whose step had a finite loss (what
    ``train.resume=auto``, ``megabatch eval`` and ``megabatch export`` take), or None."""
    found = [c for c in complete_checkpoints(run_dir / "checkpoints") if c.loss_is_finite]
    return found[-1] if found else None


def config_changes(checkpoint: Checkpoint, config: RunConfig) -> list[Change]:
    """Every key whose value differs between the config that wrote ``checkpoint`` and
    ``config`` (none for a checkpoint written before configs were recorded). A key the
    old config lacks (added to megabatch since) and that ``config`` leaves at its default
    is no change: a new key's default is the behaviour from before it existed."""
    old = checkpoint.meta.get("config")
    if not isinstance(old, dict):
        return []
    defaults = _flatten(plain_dict(RunConfig()))
    return [c for c in _differences(_flatten(old), _flatten(plain_dict(config)))
            if not (c.old is _ABSENT and c.key in defaults and c.new == defaults[c.key])]  # fmt: skip


def refused_changes(changes: list[Change], for_eval: bool = False) -> list[Change]:
    """The changes a resume refuses; ``for_eval``: those that make it another model
    (task, model, tokenizer), which evaluation and export refuse."""
    return [c for c in changes if _matches(c.key, REFUSED_FOR_EVAL if for_eval else REFUSED)]


def _matches(key: str, rules) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in rules)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}; lists (shard lists, betas) are values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _differences(old: dict, new: dict) -> list[Change]:
    keys = list(new) + [k for k in old if k not in new]
    return [Change(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]  # fmt: skip
