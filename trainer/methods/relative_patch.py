"""Relative patch position (Doersch, Gupta and Efros 2015): the centre patch of a 3 x 3
grid over the image and one of its 8 neighbours, drawn per sample; the classifier sees
both encodings (centre first) and names the neighbour's position, 8 ways. Telling where
a piece sits relative to another needs what the object looks like; the grid's gaps and
jitter (methods/patches.py) deny it the low-level answer of continuing an edge across
the border.

Geometry, for a cell of side c (a third of the loaded side: 16 px for the digits' 48):
the paper's proportions, patch p = floor(2c/3) (96 px patches, 144 px cell pitch in the
paper; 10 px here), jitter j = floor((c - p)/3) on each axis (the paper's 7 px against
its 48 px gap; 2 px here), so two patches are 6 px apart, never less than 2. The paper
also drops colour channels against chromatic aberration, which lets a lens's colour
fringes tell where a patch lay in the frame: the digits are grey scans, so there is no
such cue, and this task does not drop channels.

Labels 0..7 are the neighbours in row-major order (the centre skipped):

    0 1 2
    3 . 4
    5 6 7
"""

from __future__ import annotations

from fractions import Fraction

import torch

from megabatch.trainer.methods.patches import CENTRE, crop
from megabatch.trainer.methods.pretext import PatchPretext

NEIGHBOURS = 8
# label -> grid cell (row-major, 0..8), the centre (4) skipped
NEIGHBOUR_CELLS = (0, 1, 2, 3, 5, 6, 7, 8)


def neighbour_offset(label: int) -> tuple[int, int]:
    """A label's (rows, columns) from the centre cell: each in {-1, 0, 1}, not both 0."""
    cell = NEIGHBOUR_CELLS[label]
    return cell // 3 - 1, cell % 3 - 1


class RelativePatchTask(PatchPretext):
    inputs_per_sample = 2
    classes = NEIGHBOURS
    patch_share = Fraction(2, 3)
    jitter_share = Fraction(1, 3)
    # Each patch keeps its brightness and contrast: how much ink a patch holds is part
    # of where it lay, and the gap already keeps the pair from being matched by their
    # edges. (Jigsaw, whose nine tiles invite comparing such statistics, does by default.)
    each_normalised = False

    def __init__(self, config, device, world_size, tokenizer=None):
        super().__init__(config, device, world_size, tokenizer)
        self.neighbour_cells = torch.tensor(NEIGHBOUR_CELLS, device=device)

    def patches(self, images, generator):
        """Patches (B, 2, 3, p, p), centre then neighbour; their positions (B, 2, 2)."""
        b = len(images)
        positions = self.grid.positions(b, generator)  # (B, 9, 2)
        labels = torch.randint(NEIGHBOURS, (b,), generator=generator, device=images.device)
        cells = torch.stack([torch.full_like(labels, CENTRE), self.neighbour_cells[labels]], 1)
        chosen = positions.gather(1, cells[..., None].expand(-1, -1, 2))  # (B, 2, 2)
        return crop(images, chosen, self.grid.patch), labels, chosen
