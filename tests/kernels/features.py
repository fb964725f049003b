"""Feature batches the kernel tests share (CPU and GPU)."""

import torch
import torch.nn.functional as F


def spread_features(n: int, d: int, *, far_from: int, device: str = "cpu", seed: int = 5):
    """(a, b), fp32 leaves: logits at scale 100 that spread beyond what one shared shift
    per tile can hold. Every a_i lies near a direction u (noise of norm 0.2), its partner
    b_j near a_j for j < far_from and near -u from far_from on, so those columns' logits
    (about -95) sit about 190 below the top (about 95) of a tile they share with near
    columns: far past fp32's exponent range (about 87)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def noise(rows):
        x = torch.randn(rows, d, generator=g, device=device, dtype=torch.float64)
        return 0.2 * F.normalize(x, dim=1)

    u = F.normalize(torch.randn(d, generator=g, device=device, dtype=torch.float64), dim=0)
    a = F.normalize(u + noise(n), dim=1)
    b = F.normalize(a + noise(n), dim=1)
    b[far_from:] = F.normalize(-u + noise(n - far_from), dim=1)
    return a.float().requires_grad_(), b.float().requires_grad_()


def paired_features(n: int, d: int, dtype: torch.dtype, *, device: str, seed: int = 0):
    """(a, b) leaves of ``dtype``, (n, d) each, unit rows, each b_i a noisy copy of a_i
    (noise 0.8 before normalising): partners closer than the rest, as trained features."""
    g = torch.Generator(device=device).manual_seed(seed)
    a = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1)
    b = F.normalize(a + 0.8 * torch.randn(n, d, device=device, generator=g), dim=1)
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
