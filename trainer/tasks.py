"""What differs between methods (CLIP, SimCLR), behind one small interface, ``Task``,
that the loop, evaluation and the checks before a run use: the model, how a loader batch
becomes model inputs, the named features of a micro-batch, the learnt loss parameters,
and which features evaluation reads. The loss itself is chosen by the config
(``loss.name``, trainer/losses.py) and handed to the task. ``TASKS`` maps ``task:`` in
the config to the class; nothing else looks at the task's name. trainer/README.md:
adding a method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.data_pipeline.read.transforms import device_preprocess
from megabatch.trainer.config import RunConfig
from megabatch.trainer.data import image_config
from megabatch.trainer.losses import LossFn, initial_loss_params, make_loss


class Task(Protocol):
    captions: ClassVar[bool]
    """Its samples carry captions: the loader tokenizes them (with the tokenizer handed
    in) and evaluation adds retrieval and zero-shot classification."""
    tokenizer: CaptionTokenizer | None
    """The one handed in (evaluation encodes class prompts with it); None without captions."""

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer: CaptionTokenizer | None): ...  # fmt: skip

    @staticmethod
    def check_model(config: RunConfig, vocab_size: int) -> None:
        """Before any process group: raise ValueError (one line) if the config's model
        keys cannot build this task's model."""

    def build_model(self) -> nn.Module: ...

    def inputs(self, batch, step: int, index: int) -> Any:
        """A loader ``Batch`` -> what ``encode`` takes, on the device (micro-batch
        ``index`` of ``step``: seeds that the GradCache re-run replays)."""

    def encode(self, model: nn.Module, micro) -> dict[str, torch.Tensor]:
        """The named (B, D) feature sets whose rows are positives of each other, in the
        order the loss takes them ({"image", "text"}; {"view1", "view2"})."""

    loss: LossFn
    """(features: name -> this rank's rows of every micro-batch, params) -> the loss over
    the global batch: ``losses.make_loss`` for the run's ``loss.name``."""

    def loss_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The learnt loss parameters the loss takes, with grad (their gradient comes
        from the loss), by name: CLIP's {"logit_scale": exp(t), clamped}; {} where the
        loss has none (NT-Xent's temperature is a hyperparameter)."""

    def image_features(self, model: nn.Module, batch) -> torch.Tensor:
        """(B, D) features of a loader batch's images, for evaluation."""

    text_features: Callable[[nn.Module, Any], torch.Tensor] | None
    """(B, D) features of a batch's captions, where ``captions``; else None."""


class ClipTask:
    captions = True

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer: CaptionTokenizer | None):  # fmt: skip
        if tokenizer is None:
            raise ValueError("task clip needs the caption tokenizer (data.tokenizer)")
        self.config, self.device, self.world_size = config, device, world_size
        self.tokenizer = tokenizer
        self.image = image_config(config)
        self.loss = make_loss(config, world_size)

    @staticmethod
    def check_model(config: RunConfig, vocab_size: int) -> None:
        from megabatch.trainer.models.clip import clip_config

        m = config.model
        clip_config(m.preset, image_size=m.image_size, context_length=m.context_length,
                    vocab_size=vocab_size, pad_id=0, sot_id=0, eot_id=0,
                    embed_dim=m.embed_dim)  # fmt: skip

    def build_model(self):
        from megabatch.trainer.models.clip import ClipModel, clip_config

        m, tok = self.config.model, self.tokenizer
        init = initial_loss_params(self.config)
        cfg = clip_config(
            m.preset, image_size=m.image_size, context_length=m.context_length,
            vocab_size=tok.vocab_size, pad_id=tok.pad_id, sot_id=tok.sot_id, eot_id=tok.eot_id,
            embed_dim=m.embed_dim, init_logit_scale=init["logit_scale"],
        )  # fmt: skip
        return ClipModel(cfg, max_logit_scale=self.config.loss.max_logit_scale,
                         init_logit_bias=init.get("logit_bias"))  # fmt: skip

    def inputs(self, batch, step: int, index: int):
        b = batch.to(self.device)
        return device_preprocess(b.images, self.image), b.tokens, b.token_mask

    def encode(self, model, micro):
        images, tokens, mask = micro
        return {"image": model.encode_image(images), "text": model.encode_text(tokens, mask)}

    def loss_params(self, model):
        params = {"logit_scale": model.logit_scale()}
        if hasattr(model, "logit_bias"):  # built for a loss that takes one (SigLIP)
            params["logit_bias"] = model.logit_bias.reshape(())
        return params

    def image_features(self, model, batch):
        images = device_preprocess(batch.to(self.device).images, self.image)
        return model.encode_image(images)

    def text_features(self, model, batch):
        b = batch.to(self.device)
        return model.encode_text(b.tokens, b.token_mask)


class SimCLRTask:
    captions = False

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer: CaptionTokenizer | None = None):  # fmt: skip
        from megabatch.data_pipeline.read.views import SimCLRViews, ViewConfig

        self.config, self.device, self.world_size = config, device, world_size
        self.tokenizer = None  # images only
        self.image = image_config(config)
        self.loss = make_loss(config, world_size)
        self.views = SimCLRViews(ViewConfig(size=config.model.image_size))

    @staticmethod
    def check_model(config: RunConfig, vocab_size: int) -> None:
        from megabatch.trainer.models.simclr import encoder_config

        encoder_config(config.model.preset, config.model.image_size)

    def build_model(self):
        from megabatch.trainer.models.simclr import SimCLRModel

        m = self.config.model
        return SimCLRModel(m.preset, m.image_size, embed_dim=m.embed_dim or 128)

    def inputs(self, batch, step: int, index: int):
        # A seed per (step, micro-batch, rank): replayed by the GradCache re-run through
        # the micro-batch itself, and different on every rank.
        seed = (self.config.seed * 1_000_003 + step) * 1009 + index * 17 + dist.get_rank()
        return batch.to(self.device).images, seed

    def encode(self, model, micro):
        images, seed = micro
        view1, view2 = self.views(images, seed)
        return {"view1": model(view1)[1], "view2": model(view2)[1]}

    def loss_params(self, model):
        return {}  # NT-Xent's temperature is a hyperparameter (loss.temperature)

    def image_features(self, model, batch):
        images = device_preprocess(batch.to(self.device).images, self.image)
        return model.features(images)

    text_features = None


# ``task:`` in the config -> the class (RunConfig.task lists the same names).
TASKS: dict[str, type[Task]] = {"clip": ClipTask, "simclr": SimCLRTask}


def make_task(config: RunConfig, device: torch.device, world_size: int,
              tokenizer: CaptionTokenizer | None) -> Task:  # fmt: skip
    return TASKS[config.task](config, device, world_size, tokenizer)
