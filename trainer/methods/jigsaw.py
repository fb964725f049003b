"""Jigsaw puzzles (Noroozi and Favaro 2016): the nine tiles of a 3 x 3 grid over the
image, shuffled by one permutation from a fixed set; the classifier sees the nine tiles'
encodings in their shuffled order and names the permutation. Putting the pieces back
needs to know what the parts of an object look like and how they go together.

The set (``method.permutations``, 100 by default, the paper's 100 to 1000) is chosen for
large Hamming distances, so that no two classes differ by a swap or two that a glance
at one tile would settle: the greedy selection of the paper's Algorithm 1, here with the
maximal-minimum criterion (``permutation_set``). It is a function of the run's seed and
the count, the same on every rank and on every start.

Geometry, for a cell of side c (16 px for the digits' 48): each tile p = floor(3c/4)
(12 px; the paper's 64 px tiles in 75 px cells, a little smaller here so that the tile
can move at all) anywhere in its cell, j = floor((c - p)/2) (2 px), so neighbours are 0
to 8 px apart. Each tile is normalised by itself (``method.normalise_each_tile``, the
paper's: matching the mean and contrast of neighbouring tiles would be a shortcut), or
as the whole images are: then the encoder's batch-norm statistics are those of the
inputs evaluation feeds it (the digits demo's choice; docs/training.md has what each
gave). The paper's colour jitter and
greyscale tiles counter chromatic aberration, a colour cue to a tile's place in the
frame; the digits are grey scans, so there is none to counter."""

from __future__ import annotations

import functools
import itertools
import math
from fractions import Fraction

import numpy as np
import torch

from megabatch.trainer.methods.patches import CELLS, crop
from megabatch.trainer.methods.pretext import PatchPretext


@functools.cache
def _every_permutation() -> np.ndarray:
    """(9!, 9) uint8: every order of the nine tiles, lexicographic."""
    flat = itertools.chain.from_iterable(itertools.permutations(range(CELLS)))
    return np.fromiter(flat, dtype=np.uint8, count=math.factorial(CELLS) * CELLS).reshape(-1, CELLS)


def permutation_set(count: int, seed: int) -> np.ndarray:
    """(count, 9) int64: ``count`` distinct permutations of the nine tiles, chosen greedily
    for large Hamming distance d(a, b) = #{i: a_i != b_i}:

        P = [a permutation drawn with ``seed``]
        repeat: P += argmax over every permutation q not in P of
                     (min_{a in P} d(a, q), then sum_{a in P} d(a, q), then the first)

    Each pick is as far from the set so far as any permutation can be (ties to the one
    farthest on average: the paper's criterion), so the set's smallest pairwise distance
    is the last pick's, and no permutation left out is farther than that from the set.
    Each pick is one pass over the 9! candidates, their distances to the set kept up to
    date."""
    every = _every_permutation()
    columns = np.ascontiguousarray(every.T)  # (9, 9!): the tile at each slot
    nearest = np.full(len(every), CELLS, dtype=np.uint8)  # min distance to the set
    total = np.zeros(len(every), dtype=np.uint32)  # sum of distances to the set
    picked = [int(np.random.default_rng(seed).integers(len(every)))]
    while len(picked) < count:
        last = every[picked[-1]]
        same = np.zeros(len(every), dtype=np.uint8)
        for slot in range(CELLS):
            same += columns[slot] == last[slot]
        distance = CELLS - same
        np.minimum(nearest, distance, out=nearest)  # 0 for the picked ones
        total += distance
        farthest = np.flatnonzero(nearest == nearest.max())
        picked.append(int(farthest[np.argmax(total[farthest])]))
    return every[picked].astype(np.int64)


class JigsawTask(PatchPretext):
    inputs_per_sample = CELLS
    patch_share = Fraction(3, 4)
    jitter_share = Fraction(1, 2)

    def __init__(self, config, device, world_size, tokenizer=None):
        super().__init__(config, device, world_size, tokenizer)
        self.permutations = torch.from_numpy(
            permutation_set(config.method.permutations, config.seed)).to(device)  # fmt: skip
        self.classes = len(self.permutations)
        self.each_normalised = config.method.normalise_each_tile

    def patches(self, images, generator):
        """Tiles (B, 9, 3, p, p) in shuffled order: slot i holds the tile of cell
        permutations[label][i]; positions (B, 9, 2) in cell order."""
        b = len(images)
        positions = self.grid.positions(b, generator)
        labels = torch.randint(self.classes, (b,), generator=generator, device=images.device)
        order = self.permutations[labels]  # (B, 9): the cell each slot shows
        shuffled = positions.gather(1, order[..., None].expand(-1, -1, 2))
        return crop(images, shuffled, self.grid.patch), labels, positions
