"""megabatch kernels: fused contrastive losses and the collectives they need.

This package imports only torch and triton (never DeepSpeed or WebDataset), so its tests
and benchmark run on a bare GPU machine that has only those two installed. Triton itself
is imported only when the triton backend is first used. The layout and how to add a
loss: kernels/README.md.
"""

from megabatch.kernels.contrastive import clip_loss, ntxent_loss
from megabatch.kernels.margin import margin_contrastive_loss
from megabatch.kernels.siglip import siglip_loss

__all__ = ["clip_loss", "ntxent_loss"]
__all__ += ["margin_contrastive_loss"]
__all__ += ["siglip_loss"]
