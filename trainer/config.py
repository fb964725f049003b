"""One config system: dataclasses are the schema; YAML files, presets and ``a.b=c``
command-line overrides are merged onto them, in that order.

    config = load_config("run.yaml", ["optim.lr=3e-4", "batch.micro_batch_size=64"])

A preset is a small YAML delta shipped in ``trainer/presets/NAME.yaml``; a config
names it with ``preset: NAME`` (the preset applies first, the file's own keys on top).
Every error a user can make (an unknown key, a wrong type, a value out of range,
impossible batch arithmetic) is a ``ConfigError`` whose one-line message names the key,
raised before any process group starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESETS_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


# --------------------------------------------------------------------------- schema
@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Tower sizes: CLIP tiny, vit-b-32, vit-b-16, vit-l-14; SimCLR resnet50, vit-small."""
    embed_dim: int | None = None
    """Width of the shared embedding space (the projections' output); None: the preset's."""
    image_size: int = 224
    """Side of the square images the image tower sees."""
    context_length: int = 77
    """Tokens per caption, start and end tokens included (CLIP)."""
    hidden_dim: int | None = None
    """Hidden width of the image-only methods' heads (MoCo v3's and BYOL's projector and
    predictor, the pretext tasks' classifier); None: twice the backbone's feature width
    (ResNet-50: 4096, MoCo v3's and BYOL's width)."""


@dataclass
class DataConfig:
    train: Any = None
    """Training shards: a folder, manifest, brace pattern, list, or weighted sources."""
    val: Any = None
    """Held-out shards for evaluation (None: no evaluation on held-out data)."""
    tokenizer: str | None = None
    """tokenizer.json (CLIP); built by ``megabatch data tokenizer``."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    load_size: int | None = None
    """Side the workers decode to (None: model.image_size); see megabatch.data_pipeline.read.transforms."""
    decoder: Literal["auto", "pil", "simplejpeg"] = "auto"
    """JPEG decoding in the workers: simplejpeg for JPEGs already at the workers' side
    (auto: when installed), PIL for the rest; pil: PIL for everything."""
    shuffle_block: int = 1000
    resampled: bool = False
    max_image_pixels: int = 2**26
    """Pixels an image may decode to (checked from its header; a JPEG after its reduced
    decode); a bigger one is skipped and counted (``oversized_image``)."""
    max_member_bytes: int = 64 * 2**20
    """Bytes one tar member may hold (checked from its header); a bigger one is streamed
    past unread and its sample skipped and counted (``oversized_member``)."""
    classnames: str | None = None
    """classnames.json for zero-shot evaluation (None: beside the val shards' folder)."""
    templates: str | None = None
    """templates.json of prompts like "a photo of the digit {}." (None: beside classnames)."""
    eval_max_samples: int = 10_000
    """Samples of each split encoded for evaluation (linear probe and kNN use train's)."""


@dataclass
class BatchConfig:
    micro_batch_size: int = 64
    """Samples per forward pass per rank."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step; all of their samples are negatives together."""
    global_batch_size: int | None = None
    """If set, must equal micro x accumulation x world size (a check, not a knob)."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "lamb", "sgd"] = "adamw"
    """adamw (torch's, decoupled decay), lamb (DeepSpeed's fused LAMB; needs CUDA), sgd."""
    lr: float = 5e-4
    """Peak learning rate, reached after warm-up."""
    weight_decay: float = 0.2
    """Decoupled decay; never applied to norms, biases or the logit scale."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    momentum: float = 0.9
    """SGD only."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr x min_lr_ratio."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0-2 (3 is refused until the towers are built under zero.Init)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_backend: Literal["auto", "triton", "torch"] = "auto"
    """Fused contrastive loss backend (kernels.clip_loss / ntxent_loss)."""


@dataclass
class LossConfig:
    name: (
        Literal["infonce", "siglip", "ntxent", "margin", "moco", "byol", "cross_entropy"] | None
    ) = None
    """The loss (trainer/losses.py); None: the task's own (clip: infonce, simclr: ntxent,
    moco: moco, byol: byol, the pretext tasks: cross_entropy). siglip: SigLIP's pairwise
    sigmoid loss, for task clip; margin: Hadsell, Chopra and LeCun's margin contrastive
    loss, for task simclr."""
    init_logit_scale: float | None = None
    """The initial logit multiplier t; None: the loss's own (infonce: CLIP's 1 / 0.07,
    siglip: SigLIP's 10)."""
    init_logit_bias: float | None = None
    """SigLIP's initial logit bias b; None: SigLIP's -10."""
    max_logit_scale: float = 100.0
    """CLIP's clamp on the multiplier."""
    temperature: float = 0.1
    """SimCLR's and MoCo v3's tau."""
    margin: float = 1.0
    """The margin loss's m: negative pairs closer than m are pushed apart (unit features:
    distances in [0, 2]; 1 is cosine 0.5)."""


@dataclass
class MethodConfig:
    """What a method adds beyond its loss (trainer/methods/)."""

    momentum: float | None = None
    """The momentum encoder's base momentum m0 (MoCo v3, BYOL), rising to 1 on a cosine
    over the run; None: the method's own (MoCo v3 0.99, BYOL 0.996)."""
    permutations: int = 100
    """Jigsaw's classes: the permutations of the nine tiles it may shuffle by, chosen
    greedily for large Hamming distance from the run's seed (trainer/methods/jigsaw.py).
    2 to 1000 (Noroozi and Favaro's 100 to 1000)."""
    normalise_each_tile: bool = True
    """Jigsaw: normalise each tile by its own mean and standard deviation (the paper's,
    so that neighbours cannot be matched by brightness and contrast); false: as the
    whole images are (what evaluation and the export feed the encoder)."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    log_every: int = 10
    eval_every: int | None = None
    """Steps between evaluations (None: only at the end)."""
    checkpoint_every_steps: int | None = 500
    checkpoint_every_minutes: float | None = 30.0
    keep_checkpoints: int | None = 3
    """Complete checkpoints kept (the newest ones); None keeps every one. An older one is
    removed only once a newer one is complete."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in the run directory, if any), ``none``, or a
    checkpoint directory (RUN/checkpoints/stepNNNNNNNN)."""
    max_nonfinite_steps: int = 5
    """Consecutive non-finite losses that stop the run."""
    collective_timeout_s: float = 600.0
    """Seconds a collective (all-reduce, barrier, ...) may wait for the other ranks before
    the run stops with an error naming the rank that stopped answering."""


@dataclass
class MetricsConfig:
    prometheus: bool = False
    """Serve Prometheus metrics at /metrics on every rank (docs/monitoring.md)."""
    port: int = 9431
    """The first rank of a node serves on this port, local rank k on port + k."""
    address: str = "127.0.0.1"
    """Bind address: loopback by default; 0.0.0.0 (all interfaces) only when a Prometheus
    on another machine must reach the ranks."""
    linger_s: float = 0.0
    """Keep serving this long after the run ends, so that a last scrape sees its final
    values (short jobs, tests)."""
    host: str | None = None
    """How Prometheus reaches this node, in RUN/prometheus-targets.json (None: the bind
    address, or the node's host name when bound to all interfaces)."""


@dataclass
class RunConfig:
    task: Literal["clip", "simclr", "moco", "byol", "rotation", "relative_patch", "jigsaw"] = "clip"
    run_dir: str = "runs/default"
    seed: int = 0
    preset: str | None = None
    """A preset applied under this config (trainer/presets/NAME.yaml)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def global_batch_size(self, world_size: int) -> int:
        """The contrastive batch: every sample of it is a negative for every other."""
        return self.batch.micro_batch_size * self.batch.accumulation_steps * world_size

    def validate(self, world_size: int = 1) -> None:
        checks = [
            ("batch.micro_batch_size", self.batch.micro_batch_size >= 1, "must be >= 1"),
            ("batch.accumulation_steps", self.batch.accumulation_steps >= 1, "must be >= 1"),
            ("data.num_workers", self.data.num_workers >= 0, "must be >= 0"),
            ("engine.zero_stage", 0 <= self.engine.zero_stage <= 3, "must be 0, 1, 2 or 3"),
            # Stage 3 partitions parameters, and transformers' CLIP text embeddings read
            # their (then empty) shapes in forward: it needs zero.Init, not done yet.
            ("engine.zero_stage", self.engine.zero_stage != 3,
             "3 is not supported yet (use 0-2; transformers' towers need zero.Init first)"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, "must be >= 0"),
            ("optim.betas", all(0 <= b < 1 for b in self.optim.betas), "must be in [0, 1)"),
            ("optim.eps", self.optim.eps >= 0, "must be >= 0"),
            ("optim.momentum", 0 <= self.optim.momentum < 1, "must be in [0, 1)"),
            ("optim.grad_clip", _none_or(self.optim.grad_clip, lambda v: v > 0), "must be > 0"),
            ("optim.warmup_steps", self.optim.warmup_steps >= 0, "must be >= 0"),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("model.embed_dim", _none_or(self.model.embed_dim, lambda v: v >= 1), "must be >= 1"),
            ("model.hidden_dim", _none_or(self.model.hidden_dim, lambda v: v >= 1), "must be >= 1"),
            ("data.load_size", _none_or(self.data.load_size, lambda v: v >= 8), "must be >= 8"),
            ("data.shuffle_block", self.data.shuffle_block >= 1, "must be >= 1"),
            ("data.max_image_pixels", self.data.max_image_pixels >= 1, "must be >= 1"),
            ("data.max_member_bytes", self.data.max_member_bytes >= 1, "must be >= 1"),
            ("data.eval_max_samples", self.data.eval_max_samples >= 1, "must be >= 1"),
            ("loss.temperature", self.loss.temperature > 0, "must be > 0"),
            ("loss.margin", self.loss.margin > 0, "must be > 0"),
            ("method.momentum", _none_or(self.method.momentum, lambda v: 0 <= v < 1),
             "must be in [0, 1)"),
            ("method.permutations", 2 <= self.method.permutations <= 1000, "must be in [2, 1000]"),
            ("loss.init_logit_scale", _none_or(self.loss.init_logit_scale,
                                               lambda v: 0 < v <= self.loss.max_logit_scale),
             "must be in (0, loss.max_logit_scale]"),
            ("train.max_steps", self.train.max_steps >= 1, "must be >= 1"),
            ("metrics.port", 1 <= self.metrics.port <= 65535 - 255, "must be in [1, 65280]"),
            ("metrics.address", bool(self.metrics.address.strip()), "must not be empty"),
            ("metrics.linger_s", 0 <= self.metrics.linger_s <= 3600, "must be in [0, 3600]"),
            ("train.log_every", self.train.log_every >= 1, "must be >= 1"),
            ("train.max_nonfinite_steps", self.train.max_nonfinite_steps >= 1, "must be >= 1"),
            ("train.eval_every", _none_or(self.train.eval_every, lambda v: v >= 1), "must be >= 1"),
            ("train.checkpoint_every_steps",
             _none_or(self.train.checkpoint_every_steps, lambda v: v >= 1), "must be >= 1"),
            ("train.checkpoint_every_minutes",
             _none_or(self.train.checkpoint_every_minutes, lambda v: v > 0), "must be > 0"),
            ("train.keep_checkpoints",
             _none_or(self.train.keep_checkpoints, lambda v: v >= 1), "must be >= 1"),
            ("train.collective_timeout_s", self.train.collective_timeout_s > 0, "must be > 0"),
            ("model.image_size", self.model.image_size >= 8, "must be >= 8"),
            ("model.context_length", self.model.context_length >= 3, "must be >= 3"),
        ]  # fmt: skip
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{key} {rule}, got {_lookup(self, key)!r}")
        wanted = self.batch.global_batch_size
        if wanted is not None and wanted != self.global_batch_size(world_size):
            raise ConfigError(
                f"batch.global_batch_size is {wanted} but micro_batch_size x "
                f"accumulation_steps x world size = {self.batch.micro_batch_size} x "
                f"{self.batch.accumulation_steps} x {world_size} = "
                f"{self.global_batch_size(world_size)}"
            )
        for key in ("data.train", "data.val"):
            value = _lookup(self, key)
            if value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{key}: expected a shard specification, got {value!r}")
            if value is not None and not value:
                raise ConfigError(f"{key} is empty (give shards, or leave it out)")
        if self.task == "clip" and self.data.train is not None and self.data.tokenizer is None:
            raise ConfigError("data.tokenizer is required for task clip")


def task_names() -> tuple[str, ...]:
    """The names ``task:`` takes (RunConfig.task's Literal; trainer/tasks.py TASKS maps
    each to its method)."""
    return typing.get_args(typing.get_type_hints(RunConfig)["task"])


def _none_or(value, rule) -> bool:
    """Optional keys: None passes, a value must pass ``rule``."""
    return value is None or rule(value)


def _lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- building
def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {path} (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)}, got {value!r}")
        return tuple(
            _coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; it is a number to a person.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # a schema bug, not a user error


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def plain_dict(config: Any) -> dict:
    """The config as JSON/YAML-ready data: nested dicts, lists for tuples."""
    return _plain(to_dict(config))


# --------------------------------------------------------------------------- merging
def _deep_merge(base: dict, delta: dict) -> dict:
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "not YAML"
        raise ConfigError(f"cannot read {what} {path}: {where}{problem}") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:  # ValueError: a NUL
        raise ConfigError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """``"optim.lr=3e-4"`` -> ``{"optim": {"lr": 0.0003}}``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    data = _read_yaml(Path(path), "config file") if path is not None else {}
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    preset = data.get("preset")
    if preset is not None:
        if preset not in available_presets():
            raise ConfigError(
                f"preset must be one of {', '.join(available_presets())}, got {preset!r}"
            )
        data = _deep_merge(_read_yaml(PRESETS_DIR / f"{preset}.yaml", "preset"), data)
    return from_dict(RunConfig, data)


def dump_config(config: RunConfig, path: str | Path, extra: dict | None = None) -> None:
    """Write the resolved config as YAML, atomically; ``extra`` facts (git revision,
    world size, ...) go in comment lines on top, so the file loads back as a config."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(config_text(config, extra))
    tmp.replace(path)


def config_text(config: RunConfig, extra: dict | None = None) -> str:
    """What ``dump_config`` writes: ``extra`` as comment lines, then the config's YAML."""
    header = "".join(f"# {key}: {value}\n" for key, value in (extra or {}).items())
    return header + yaml.safe_dump(plain_dict(config), sort_keys=False)


def _plain(value):
    """Tuples as lists, so safe_dump writes plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
