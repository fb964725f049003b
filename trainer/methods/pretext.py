"""What the pretext tasks share (rotation, relative patch position, jigsaw): a label made
up from the image itself, predicted by a classifier over the encoder's features of the
sample's k inputs (models/pretext.py), trained with cross-entropy (losses.LOSSES
"cross_entropy", which reads "logits" (B, K) and "labels" (B,)). No negatives: nothing
couples the samples of a batch, so plain gradient accumulation trains it.

``inputs`` makes the inputs and labels on the device from a generator seeded per (seed,
step, micro-batch, rank) (``augmentation_seed``): a resumed run replays exactly what an
uninterrupted one saw. ``PatchPretext`` adds what the two patch tasks share: the grid
over the loaded image (methods/patches.py), patches of side image_size // 2 for the
encoder, ResNet backbones only."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from fractions import Fraction
from typing import ClassVar

import torch

from megabatch.trainer.config import RunConfig
from megabatch.trainer.methods.base import ImageMethod
from megabatch.trainer.methods.patches import GRID, Grid, encoder_inputs

# The smallest loaded side a 3 x 3 grid is cut from: cells of 4 px, patches of 2 or 3.
MIN_GRID_SIDE = 4 * GRID


class PretextMethod(ImageMethod, ABC):
    step_kind = "accumulate"
    inputs_per_sample: ClassVar[int]  # k: the encoder inputs of one sample
    classes: int  # K: the labels ``examples`` draws from

    @abstractmethod
    def examples(self, images: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """uint8 images (B, 3, L, L) as loaded -> (encoder inputs (B, k, 3, P, P) float32,
        labels (B,) int64 in [0, K)), every draw from ``generator``."""

    def build_model(self):
        from megabatch.trainer.models.pretext import PretextModel

        m = self.config.model
        return PretextModel(m.preset, m.image_size, self.inputs_per_sample, self.classes,
                            hidden=m.hidden_dim)  # fmt: skip

    def inputs(self, batch, step: int, index: int):
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.augmentation_seed(step, index))
        return self.examples(batch.to(self.device).images, generator)

    def encode(self, model, micro):
        inputs, labels = micro
        return {"logits": model(inputs), "labels": labels}


class PatchPretext(PretextMethod):
    """Relative patch position and jigsaw: patches from a 3 x 3 grid over the loaded image
    (data.load_size, which keeps the detail that resizing to model.image_size would
    lose), each resized to ``patch_size`` for the encoder."""

    # Each paper's proportions, for a cell of side c (patches.Grid): the patch side
    # p = floor(c x patch_share), the jitter j = floor((c - p) x jitter_share).
    patch_share: ClassVar[Fraction]
    jitter_share: ClassVar[Fraction]
    each_normalised: bool  # each patch normalised by itself (patches.encoder_inputs)

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer=None):  # fmt: skip
        super().__init__(config, device, world_size, tokenizer)
        self.grid = self.grid_for(config)
        # P = S / 2: nine tiles then cost 9/4 of a whole image to encode (about SimCLR's
        # two views), and a ResNet still keeps a 4 x 4 map after its stride-4 stem at
        # S = 32. The patches' strokes come out thicker than the whole image's (a 10 px
        # patch of a 48 px image is magnified 1.6x, the whole image 0.67x): the scale
        # gap the papers accept too.
        self.patch_size = config.model.image_size // 2

    @abstractmethod
    def patches(self, images: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """uint8 images (B, 3, L, L) -> (uint8 patches (B, k, 3, p, p) as cut, in the order
        the classifier sees them; labels (B,); (top, left) positions (B, ., 2) of the
        patches in the image, for checking the geometry), every draw from ``generator``."""

    def examples(self, images, generator):
        patches, labels, _ = self.patches(images, generator)
        return encoder_inputs(patches, self.patch_size, self.image, self.each_normalised), labels

    @classmethod
    def grid_for(cls, config: RunConfig) -> Grid:
        side = config.data.load_size or config.model.image_size
        cell = side // GRID
        patch = math.floor(cell * cls.patch_share)
        return Grid(side, patch, math.floor((cell - patch) * cls.jitter_share))

    @classmethod
    def check_model(cls, config: RunConfig, vocab_size: int) -> None:
        from megabatch.trainer.models.simclr import encoder_config

        if encoder_config(config.model.preset, config.model.image_size).model_type != "resnet":
            raise ValueError(f"task {config.task} needs a ResNet model.preset (tiny-resnet, "
                             f"resnet50): its patches are model.image_size // 2 px, and a ViT's "
                             f"position embeddings fix its input at model.image_size")  # fmt: skip
        side = config.data.load_size or config.model.image_size
        if side < MIN_GRID_SIDE:
            raise ValueError(f"task {config.task} cuts a 3 x 3 grid of patches from the "
                             f"loaded images: data.load_size (or model.image_size) must be "
                             f">= {MIN_GRID_SIDE}, got {side}")  # fmt: skip
