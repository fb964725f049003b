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


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """SigLIP: -1/N sum_ij log sigmoid(z_ij l_ij), l = t A B^T + b (N, N), z_ij = +1 if
    i == j else -1."""
    dtype = _compute_dtype(image_features.dtype)
    a, b = image_features.to(dtype), text_features.to(dtype)
    logits = logit_scale * (a @ b.t()) + logit_bias
    signed = -logits  # z l, z = -1 off the diagonal ...
    signed.diagonal().neg_()  # ... and +1 on it (no N x N sign matrix)
    return -F.logsigmoid(signed).sum() / a.shape[0]


def margin_contrastive_loss_reference(
    a: torch.Tensor, b: torch.Tensor, margin: torch.Tensor | float
) -> torch.Tensor:
    """Margin contrastive loss (kernels/margin.py): 1/N sum_i 1/2 D_ii^2
    + 1/(N(N-1)) sum_{i != j} 1/2 max(0, m - D_ij)^2, D_ij = |a_i - b_j| over (N, N)."""
    dtype = _compute_dtype(a.dtype)
    a, b = a.to(dtype), b.to(dtype)
    n = a.shape[0]
    positive = 0.5 * (a - b).square().sum(dim=1).mean()
    sq = (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * (a @ b.t())).clamp(min=0)
    # D = 0 gets gradient 0 (sqrt's derivative there is infinite): sqrt only where D^2 > 0.
    nonzero = sq > 0
    dist = torch.where(nonzero, torch.where(nonzero, sq, 1.0).sqrt(), 0.0)
    hinge = (margin - dist).clamp(min=0)
    hinge = hinge.masked_fill(torch.eye(n, dtype=torch.bool, device=a.device), 0.0)
    return positive + 0.5 * hinge.square().sum() / max(n * (n - 1), 1)
