"""What differs between CLIP and SimCLR, behind one small interface the loop uses:
the model, how a loader batch becomes model inputs, the features of a micro-batch, the
loss over the whole contrastive batch, and which features evaluation reads."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megabatch.data_pipeline.read.transforms import ImageConfig, device_preprocess
from megabatch.kernels import clip_loss, ntxent_loss
from megabatch.trainer.config import RunConfig


class ClipTask:
    name = "clip"

    def __init__(self, config: RunConfig, device: torch.device, world_size: int):
        from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer

        self.config, self.device, self.world_size = config, device, world_size
        self.tokenizer = CaptionTokenizer.load(config.data.tokenizer, config.model.context_length)
        self.image = _image_config(config)

    def build_model(self):
        from megabatch.trainer.models.clip import ClipModel, clip_config

        m, tok = self.config.model, self.tokenizer
        cfg = clip_config(
            m.preset, image_size=m.image_size, context_length=m.context_length,
            vocab_size=tok.vocab_size, pad_id=tok.pad_id, sot_id=tok.sot_id, eot_id=tok.eot_id,
            embed_dim=m.embed_dim, init_logit_scale=self.config.loss.init_logit_scale,
        )  # fmt: skip
        return ClipModel(cfg, max_logit_scale=self.config.loss.max_logit_scale)

    def inputs(self, batch, step: int, index: int):
        b = batch.to(self.device)
        return device_preprocess(b.images, self.image), b.tokens, b.token_mask

    def encode(self, model, micro):
        images, tokens, mask = micro
        return model.encode_image(images), model.encode_text(tokens, mask)

    def loss(self, a, b, scale):
        group = dist.group.WORLD if self.world_size > 1 else None
        return clip_loss(a, b, scale, process_group=group, backend=self.config.engine.loss_backend)

    def scale(self, model):
        return model.logit_scale()

    def image_features(self, model, batch):
        images = device_preprocess(batch.to(self.device).images, self.image)
        return model.encode_image(images)

    def text_features(self, model, batch):
        b = batch.to(self.device)
        return model.encode_text(b.tokens, b.token_mask)


class SimCLRTask:
    name = "simclr"

    def __init__(self, config: RunConfig, device: torch.device, world_size: int):
        from megabatch.data_pipeline.read.views import SimCLRViews, ViewConfig

        self.config, self.device, self.world_size = config, device, world_size
        self.tokenizer = None
        self.image = _image_config(config)
        self.views = SimCLRViews(ViewConfig(size=config.model.image_size))

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
        return model(view1)[1], model(view2)[1]

    def loss(self, a, b, scale):
        group = dist.group.WORLD if self.world_size > 1 else None
        return ntxent_loss(a, b, self.config.loss.temperature, process_group=group,
                           backend=self.config.engine.loss_backend)  # fmt: skip

    def scale(self, model):
        return None

    def image_features(self, model, batch):
        images = device_preprocess(batch.to(self.device).images, self.image)
        return model.features(images)

    text_features = None


def make_task(config: RunConfig, device: torch.device, world_size: int):
    return (ClipTask if config.task == "clip" else SimCLRTask)(config, device, world_size)


def _image_config(config: RunConfig) -> ImageConfig:
    """What the workers and the device do to images, from the run's model and data keys."""
    return ImageConfig(size=config.model.image_size, load_size=config.data.load_size,
                       decoder=config.data.decoder, max_pixels=config.data.max_image_pixels)  # fmt: skip
