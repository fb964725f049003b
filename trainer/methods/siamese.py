"""What MoCo v3 and BYOL share: SimCLR's two views of each image, an online network with
a predictor (models/siamese.py) and a momentum target network (methods/momentum.py).

    online:  p_v = q(g(f(view_v)))            (B, E) unit, with grad
    target:  z_v = g'(f'(view_v))             (B, E) unit, no grad (``targets``)
    loss(p1, p2, z1, z2): each view's p against the other view's z (losses.py)

The two views are made once per micro-batch in ``inputs`` (seeded from (step, index,
rank)): ``encode`` and ``targets`` both read them, and the GradCache re-run replays the
online side only. After every optimizer step the target moves towards the online f and
g by the cosine momentum schedule; the target is the method's state in checkpoints.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.trainer.config import RunConfig
from megabatch.trainer.methods.base import ImageMethod
from megabatch.trainer.methods.momentum import MomentumTarget, cosine_momentum


class SiameseMethod(ImageMethod):
    base_momentum: ClassVar[float]  # m0 where method.momentum is unset
    last_norm: ClassVar[bool]  # the MLPs end in a batch norm (MoCo v3) or not (BYOL)

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer: CaptionTokenizer | None = None):  # fmt: skip
        from megabatch.data_pipeline.read.views import SimCLRViews, ViewConfig

        super().__init__(config, device, world_size, tokenizer)
        self.views = SimCLRViews(ViewConfig(size=config.model.image_size))
        self.target: MomentumTarget | None = None  # made by build_model, from its weights
        m = config.method.momentum
        self.momentum = m if m is not None else self.base_momentum

    def build_model(self):
        from megabatch.trainer.models.siamese import SiameseModel
        from megabatch.trainer.models.simclr import image_backbone

        m = self.config.model
        _, width = image_backbone(m.preset, m.image_size)
        model = SiameseModel(m.preset, m.image_size, embed_dim=m.embed_dim or 256,
                             hidden=m.hidden_dim or 2 * width, last_norm=self.last_norm)  # fmt: skip
        # The target starts as the online network's f and g (the same initial weights).
        self.target = MomentumTarget(model.mirrored(), self.device)
        return model

    def inputs(self, batch, step: int, index: int):
        views = self.views(batch.to(self.device).images, self.augmentation_seed(step, index))
        return tuple(views)

    def encode(self, model, micro):
        view1, view2 = micro
        return {"p1": model(view1), "p2": model(view2)}

    @torch.no_grad()
    def targets(self, micro):
        from megabatch.trainer.models.siamese import target_embed

        view1, view2 = micro
        net = self.target.network
        return {"z1": target_embed(net, view1.float()), "z2": target_embed(net, view2.float())}

    def after_optimizer_step(self, model, step: int) -> None:
        momentum = cosine_momentum(self.momentum, step, self.config.train.max_steps)
        self.target.update(model.mirrored(), momentum)

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "target" not in state:
            raise ValueError(f"the checkpoint holds no target network for task "
                             f"{self.config.task} (method.pt missing or incomplete)")  # fmt: skip
        self.target.load_state_dict(state["target"])
