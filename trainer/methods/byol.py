"""BYOL (Grill et al. 2020): an online network with a predictor regresses the momentum
target's projection of the other view (methods/siamese.py; losses.byol_loss, the
normalised MSE). No negatives: nothing couples the samples of a batch, so plain
gradient accumulation (trainer/step.py) replaces GradCache's second forward. Base
momentum 0.996, the paper's."""

from __future__ import annotations

from megabatch.trainer.methods.siamese import SiameseMethod


class ByolTask(SiameseMethod):
    step_kind = "accumulate"
    base_momentum = 0.996
    last_norm = False
