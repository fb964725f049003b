"""Where the patch-based pretext tasks (relative patch position, jigsaw) cut their inputs:
a 3 x 3 grid of jittered square patches over the image the workers loaded, cropped and
made into encoder inputs batched on the device, with no loop over samples.

The grid over a side-L image (cells numbered 0..8 row by row, 4 the centre):

    cell side    c = L // 3             (L mod 3 pixels left as a margin, split evenly)
    patch side   p <= c                 each patch centred in its cell ...
    jitter       j <= (c - p) // 2      ... and moved by (dy, dx), each uniform in [-j, j]

so a patch never leaves its cell, and two neighbours are c - p apart before jitter,
c - p - 2j at the least: the gap that keeps a network from matching edges or lines
across the border (Doersch et al. 2015), the jitter that keeps it from matching their
alignment. What a method chooses (p and j) is in its own module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megabatch.data_pipeline.read.transforms import ImageConfig, normalize

GRID = 3  # rows and columns
CELLS = GRID * GRID
CENTRE = CELLS // 2

# The floor on a patch's standard deviation when each patch is normalised by itself:
# about a fifth of a digit image's (pixels in [0, 1]), so a blank patch, whose only
# content is compression noise, is not blown up to unit variance.
MIN_PATCH_STD = 0.05


@dataclass(frozen=True)
class Grid:
    side: int  # L, the loaded image's side
    patch: int  # p
    jitter: int  # j

    def __post_init__(self):
        if not 1 <= self.patch <= self.cell:
            raise ValueError(f"a patch of {self.patch} px does not fit a {self.cell} px cell "
                             f"of a {self.side} px image")  # fmt: skip
        if not 0 <= self.jitter <= (self.cell - self.patch) // 2:
            raise ValueError(f"jitter {self.jitter} px would move a {self.patch} px patch out "
                             f"of its {self.cell} px cell")  # fmt: skip

    @property
    def cell(self) -> int:
        return self.side // GRID

    def positions(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B, 9, 2) int64 on the generator's device: each patch's (top, left) in the
        image, cells in row-major order, a fresh jitter per sample and patch."""
        c, device = self.cell, generator.device
        index = torch.arange(CELLS, device=device)
        cells = torch.stack([index // GRID, index % GRID], dim=-1)  # (9, 2): row, column
        start = (self.side - GRID * c) // 2 + (c - self.patch) // 2
        jitter = torch.randint(-self.jitter, self.jitter + 1, (batch, CELLS, 2),
                               generator=generator, device=device)  # fmt: skip
        return start + c * cells + jitter


def crop(images: torch.Tensor, positions: torch.Tensor, side: int) -> torch.Tensor:
    """images (B, 3, L, L), positions (B, k, 2) (top, left) -> (B, k, 3, side, side):
    patch i of sample b is images[b, :, top:top + side, left:left + side]. One gather
    (advanced indexing), on the images' device, in their dtype."""
    offsets = torch.arange(side, device=images.device)
    rows = (positions[..., 0, None] + offsets)[..., :, None]  # (B, k, side, 1)
    cols = (positions[..., 1, None] + offsets)[..., None, :]  # (B, k, 1, side)
    sample = torch.arange(len(images), device=images.device)[:, None, None, None]
    pixels = images.permute(0, 2, 3, 1)[sample, rows, cols]  # (B, k, side, side, 3)
    return pixels.permute(0, 1, 4, 2, 3)


def encoder_inputs(patches: torch.Tensor, size: int, image: ImageConfig,
                   each_normalised: bool) -> torch.Tensor:  # fmt: skip
    """uint8 patches (B, k, 3, p, p) -> float32 (B, k, 3, size, size): resized
    (bilinear, antialiased when shrinking), then normalised either as the whole images
    are (``image``'s mean and std: what evaluation and the export feed the encoder) or
    each patch by itself, per channel:

        x' = (x - mean(x)) / max(std(x), MIN_PATCH_STD)

    which removes what a patch's brightness and contrast say about its neighbours
    (Noroozi & Favaro 2016: a low-level shortcut, not a feature)."""
    b, k = patches.shape[:2]
    x = patches.flatten(0, 1).float().div_(255.0)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).clamp_(0.0, 1.0)  # fmt: skip
    if each_normalised:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True).clamp_min_(MIN_PATCH_STD)
        x = (x - mean).div_(std)
    else:
        x = normalize(x, image.mean, image.std)
    return x.reshape(b, k, *x.shape[1:])
