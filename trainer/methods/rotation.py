"""Rotation prediction (Gidaris, Singh and Komodakis 2018): each image turned by 0, 90,
180 or 270 degrees, the turn drawn per sample, and the encoder's features of the turned
image classified 4 ways. Recognising which way is up needs the object's shape (a "7"
upside down is not a "7"), and right-angle turns of a square image leave no trace in
the pixels (no borders, no interpolation) that would give the answer away."""

from __future__ import annotations

import torch

from megabatch.data_pipeline.read.transforms import device_preprocess
from megabatch.trainer.methods.pretext import PretextMethod

TURNS = 4  # quarter turns: labels 0, 1, 2, 3 = 0, 90, 180, 270 degrees anticlockwise


def rotated(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """images (B, C, S, S), turns (B,) in [0, 4) -> images[b] turned by turns[b] quarter
    turns anticlockwise (``torch.rot90(images[b], turns[b], (-2, -1))``), batched: the
    four turned copies of the batch (4, B, C, S, S), each sample taken from its turn's
    (a gather: no host sync, as a boolean mask would need)."""
    turned = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(TURNS)])
    return turned[turns, torch.arange(len(images), device=images.device)]


class RotationTask(PretextMethod):
    inputs_per_sample = 1
    classes = TURNS

    def examples(self, images, generator):
        x = device_preprocess(images, self.image)  # the whole image at model.image_size
        turns = torch.randint(TURNS, (len(x),), generator=generator, device=x.device)
        return rotated(x, turns).unsqueeze(1), turns
