"""Full-logits reference losses: the definition the fused backends are tested against.

These materialise the N x N (or 2N x 2N) logits and let autograd do the backward, so
they need O(N^2) memory: for tests and benchmarks only. Logits are computed in fp32
(fp64 for fp64 inputs) whatever the input dtype, matching the fused backends'
accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def clip_loss_reference(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: (CE(S, I) + CE(S^T, I)) / 2 with S = s * A B^T, (N, N)."""
    dtype = _compute_dtype(image_features.dtype)
    a, b = image_features.to(dtype), text_features.to(dtype)
    logits = logit_scale * (a @ b.t())
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def ntxent_loss_reference(
    z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor | float
) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N views Z = [z1; z2]: S = Z Z^T / tau, diagonal excluded."""
    dtype = _compute_dtype(z1.dtype)
    z = torch.cat([z1, z2]).to(dtype)
    n = z1.shape[0]
    logits = (z @ z.t()) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(logits, labels)
