"""What the image-only methods share: SimCLR's backbones and evaluation on their
features, no captions, no learnt loss parameters, augmentation seeds; and the parts of
the contract that only momentum-encoder methods fill in."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.data_pipeline.read.transforms import device_preprocess
from megabatch.trainer.config import RunConfig
from megabatch.trainer.data import image_config
from megabatch.trainer.losses import make_loss


class NoTargetNetwork:
    """A method whose loss reads only the trained model: no target features, nothing to
    do after the optimizer step, no state of its own in checkpoints."""

    def targets(self, micro) -> dict[str, torch.Tensor]:
        return {}

    def after_optimizer_step(self, model, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the checkpoint holds method state ({', '.join(sorted(state))}) "
                             f"that task {self.config.task} does not keep")  # fmt: skip


class ImageMethod(NoTargetNetwork):
    """An image-only method on SimCLR's backbones (models/simclr.py): evaluation and
    export read the encoder's features (``model.features``)."""

    captions = False
    step_kind = "gradcache"
    text_features = None

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer: CaptionTokenizer | None = None):  # fmt: skip
        self.config, self.device, self.world_size = config, device, world_size
        self.tokenizer = None  # images only
        self.image = image_config(config)
        self.loss = make_loss(config, world_size)

    @staticmethod
    def check_model(config: RunConfig, vocab_size: int) -> None:
        from megabatch.trainer.models.simclr import encoder_config

        encoder_config(config.model.preset, config.model.image_size)

    def augmentation_seed(self, step: int, index: int) -> int:
        """A seed per (step, micro-batch, rank): the same when the GradCache re-run
        replays a micro-batch, different on every rank and step."""
        return (self.config.seed * 1_000_003 + step) * 1009 + index * 17 + dist.get_rank()

    def loss_params(self, model) -> dict[str, torch.Tensor]:
        return {}

    def image_features(self, model, batch) -> torch.Tensor:
        images = device_preprocess(batch.to(self.device).images, self.image)
        return model.features(images)
