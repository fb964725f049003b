"""CLIP: image and text towers (models/clip.py), trained with a loss over the global
batch's image-caption pairs (infonce, CLIP's softmax; siglip, SigLIP's sigmoid)."""

from __future__ import annotations

import torch

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.data_pipeline.read.transforms import device_preprocess
from megabatch.trainer.config import RunConfig
from megabatch.trainer.data import image_config
from megabatch.trainer.losses import initial_loss_params, make_loss
from megabatch.trainer.methods.base import NoTargetNetwork


class ClipTask(NoTargetNetwork):
    """CLIP (Radford et al. 2021): an image and a text tower, the image and its caption
    a positive pair, every other caption of the global batch a negative."""

    captions = True
    step_kind = "gradcache"

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
