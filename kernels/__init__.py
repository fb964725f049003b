"""megabatch kernels: fused contrastive losses and the collectives they need.

This package imports only torch and triton (never DeepSpeed or WebDataset), so its tests
and benchmark run on a bare GPU machine that has only those two installed. Triton itself
is imported only when the triton backend is first used.
"""

from megabatch.kernels.contrastive import clip_loss, ntxent_loss
from megabatch.kernels.distributed import all_gather_with_grad

__all__ = ["all_gather_with_grad", "clip_loss", "ntxent_loss"]
