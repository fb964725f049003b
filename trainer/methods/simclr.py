"""SimCLR (Chen et al. 2020): two augmented views of each image (data_pipeline's
SimCLRViews) through one encoder and projection head (models/simclr.py); each view's
positive is the other view, the global batch's other 2N - 2 views its negatives
(ntxent; or the margin loss)."""

from __future__ import annotations

import torch

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.trainer.config import RunConfig
from megabatch.trainer.methods.base import ImageMethod


class SimCLRTask(ImageMethod):
    step_kind = "gradcache"

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer: CaptionTokenizer | None = None):  # fmt: skip
        from megabatch.data_pipeline.read.views import SimCLRViews, ViewConfig

        super().__init__(config, device, world_size, tokenizer)
        self.views = SimCLRViews(ViewConfig(size=config.model.image_size))

    def build_model(self):
        from megabatch.trainer.models.simclr import SimCLRModel

        m = self.config.model
        return SimCLRModel(m.preset, m.image_size, embed_dim=m.embed_dim or 128)

    def inputs(self, batch, step: int, index: int):
        # The views are made in encode, from this seed: the GradCache re-run replays them.
        return batch.to(self.device).images, self.augmentation_seed(step, index)

    def encode(self, model, micro):
        images, seed = micro
        view1, view2 = self.views(images, seed)
        return {"view1": model(view1)[1], "view2": model(view2)[1]}
