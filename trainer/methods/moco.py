"""MoCo v3 (Chen, Xie and He 2021): an online network with a predictor and a momentum
target (methods/siamese.py); the symmetrised InfoNCE of each view's prediction against
the other view's target projection, every other sample of the global batch a negative
(losses.moco_loss, the fused kernel), hence the GradCache step. Base momentum 0.99; the
MLPs end in batch norm, as the paper's."""

from __future__ import annotations

from megabatch.trainer.methods.siamese import SiameseMethod


class MocoTask(SiameseMethod):
    step_kind = "gradcache"
    base_momentum = 0.99
    last_norm = True
