"""Fused contrastive losses: ``clip_loss`` (CLIP's InfoNCE) and ``ntxent_loss`` (SimCLR).

Neither backend below ever holds the N x N logits: the loss and its gradient come from
two tiled primitives, ``row_logsumexp`` and ``row_gradient`` (the ContrastiveBackend
interface and its maths in ``backend.py``), implemented once in Triton (GPU,
``triton_backend/``) and once in plain torch (CPU, ``torch_backend.py``). This module
validates inputs, chooses the backend and runs the passes, including the collectives
when the batch is spread over ranks.

Passes, for N pairs of D-dim features (M local rows per rank, N global):

CLIP  forward   1. row_logsumexp(A_local, B_global, with_col)   -> lse_img (M), col partial (N)
                   [ranks: combine the column partials -> lse_txt (N); gather lse_img -> (N)]
      backward  2. row_gradient(A_local, B_global, lse_img, lse_txt)            -> dA_local
                3. row_gradient(B_local, A_global, lse_txt[local], lse_img)     -> dB_local
                (one process, torch backend: pass 2 also accumulates dB = W^T A; no pass 3)
NT-Xent         Z = [z1; z2] (a view when z2 follows z1 in memory, else a copy);
                S = Z Z^T / tau is symmetric, so column statistics are row ones
      forward   1. row_logsumexp(Z_local, Z_global)                  -> lse (2M) [gather -> (2N)]
      backward  2. row_gradient(Z_local, Z_global, lse, lse_global)  -> dZ_local

Every rank computes its local rows against the gathered columns, and every rank gets the
*complete* gradient for its own rows from its own passes, so no gradient is reduced
across ranks; the only collectives are all-gathers of features and of O(N) statistics in
the forward and one scalar all-reduce (d loss / d scale) in the backward. The returned
loss is the global loss, identical on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megabatch.kernels import torch_backend
from megabatch.kernels.backend import ContrastiveBackend, LossMode
from megabatch.kernels.distributed import all_gather_rows, group_rank_and_size

BACKENDS = ("auto", "triton", "torch", "reference")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------- collectives
def _gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, int, int]:
    """(n_local, D) -> (n_global, D) in rank order, this rank's first row, n_global."""
    gathered, counts = all_gather_rows(x, group)
    rank = group_rank_and_size(group)[0]
    return gathered, sum(counts[:rank]), sum(counts)


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group_rank_and_size(group)[1] > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _all_reduce_logsumexp(t: torch.Tensor, group) -> torch.Tensor:
    """Elementwise log(sum over ranks of exp(t)), with a max shift so nothing overflows."""
    if group_rank_and_size(group)[1] == 1:
        return t
    hi = t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    hi_safe = torch.where(torch.isinf(hi), torch.zeros_like(hi), hi)
    total = torch.exp(t - hi_safe)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return hi_safe + torch.log(total)


# --------------------------------------------------------------------------- autograd
class _FusedContrastiveLoss(torch.autograd.Function):
    """Loss of local rows x against gathered columns; see the module docstring.

    x, y: (M, D) local rows: CLIP's image and text features; NT-Xent's z1 and z2, whose
        rows [z1; z2] (2M, D) are both the rows and, gathered, the columns;
    scale: (1,) fp32 logit multiplier (CLIP's logit_scale, NT-Xent's 1 / tau);
    mode: a LossMode; impl: the ContrastiveBackend that runs the passes.
    """

    @staticmethod
    def forward(ctx, x, y, scale, mode, group, impl):
        if mode == LossMode.NTXENT:
            x, y = _stacked(x, y), None
        a_global, offset, n_global = _gather_rows(x, group)
        m = x.shape[0]
        if mode == LossMode.CLIP:
            b_global, _, _ = _gather_rows(y, group)
            lse_rows, positive, col_part = impl.row_logsumexp(
                x, b_global, scale, row_offset=offset, mode=mode, with_col=True
            )
            lse_cols = _all_reduce_logsumexp(col_part, group)  # (N,) text -> image
            lse_rows_global, _, _ = _gather_rows(lse_rows, group)  # (N,) image -> text
            local_sum = (lse_rows - positive).sum() + (
                lse_cols[offset : offset + m] - positive
            ).sum()
            n_pairs = n_global
            ctx.save_for_backward(
                x, y, a_global, b_global, scale, lse_rows, lse_cols, lse_rows_global
            )
        else:
            lse_rows, positive, _ = impl.row_logsumexp(
                x, a_global, scale, row_offset=offset, mode=mode, with_col=False
            )
            lse_global, _, _ = _gather_rows(lse_rows, group)  # (2N,); S symmetric: = columns
            local_sum = (lse_rows - positive).sum()
            n_pairs = n_global // 2  # n_global counts views: two per pair
            ctx.save_for_backward(x, a_global, scale, lse_rows, lse_global)
        # Both losses average 2N terms: CLIP's N rows + N columns, NT-Xent's 2N views.
        coef = 1.0 / (2 * n_pairs)
        ctx.mode, ctx.group, ctx.impl, ctx.offset, ctx.coef = mode, group, impl, offset, coef
        return (_all_reduce_sum(local_sum, group) * coef).to(scale.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        impl, mode, offset, coef, group = ctx.impl, ctx.mode, ctx.offset, ctx.coef, ctx.group
        if mode == LossMode.CLIP:
            x, y, a_global, b_global, scale, lse_rows, lse_cols, lse_rows_global = ctx.saved_tensors
        else:
            x, a_global, scale, lse_rows, lse_global = ctx.saved_tensors
        # dL/dX = g * coef * s * W @ Y; computed on the device, no host sync.
        out_mult = (grad_loss.to(scale.dtype) * scale * coef).reshape(1)
        single_process = group_rank_and_size(group)[1] == 1
        if mode == LossMode.CLIP and single_process and impl.supports_column_gradient:
            # One pass yields dA and dB (see torch_backend); its gs covers each entry
            # of W * S once, where the two passes below cover it twice.
            dx, gs, dy = impl.row_gradient(
                x,
                b_global,
                scale,
                out_mult,
                lse_rows,
                lse_cols,
                row_offset=offset,
                mode=mode,
                with_col_grad=True,
            )
            gs = 2 * gs.sum()
        elif mode == LossMode.CLIP:
            m = x.shape[0]
            dx, gs_x = impl.row_gradient(
                x, b_global, scale, out_mult, lse_rows, lse_cols, row_offset=offset, mode=mode
            )
            lse_txt_local = lse_cols[offset : offset + m]
            dy, gs_y = impl.row_gradient(
                y,
                a_global,
                scale,
                out_mult,
                lse_txt_local,
                lse_rows_global,
                row_offset=offset,
                mode=mode,
            )
            gs = gs_x.sum() + gs_y.sum()
        else:
            dz, gs = impl.row_gradient(
                x, a_global, scale, out_mult, lse_rows, lse_global, row_offset=offset, mode=mode
            )
            dx, dy = dz.chunk(2)  # views: d loss / d z1, d loss / d z2
            gs = gs.sum()
        # Summed over every row pass of every rank, gs counts each entry of W * S twice
        # (CLIP: once from the image side, once from the text side; NT-Xent: W is the
        # symmetrised gradient), hence the / 2:  dL/ds = coef * sum(W * S) / (2 s).
        gs = _all_reduce_sum(gs, group)
        dscale = (grad_loss * coef * gs / (2 * scale)).to(scale.dtype).reshape(scale.shape)
        return dx, dy, dscale, None, None, None


# --------------------------------------------------------------------------- validation
def _check_features(name: str, *tensors: torch.Tensor) -> None:
    first = tensors[0]
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: features must be tensors, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name}: features must be 2-D (N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name}: features must be float32, bfloat16 or float16 (float64: torch and "
                f"reference backends), got {t.dtype}"
            )
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name}: feature shapes differ: {tuple(first.shape)} vs {tuple(t.shape)}"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name}: features are on different devices: {first.device} vs {t.device}"
            )
        if t.dtype != first.dtype:
            raise ValueError(f"{name}: feature dtypes differ: {first.dtype} vs {t.dtype}")
    if first.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (N == 0)")
    if first.shape[1] == 0:
        raise ValueError(f"{name}: zero-dimensional features (D == 0)")


def _as_scale_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        t = value
    elif isinstance(value, (int, float)):
        t = torch.tensor(float(value))
    else:
        raise ValueError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")
    # One device-to-host read per call: a NaN scale would silently poison every gradient.
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} must be finite, got {float(t.detach().reshape(()))}")
    return t


def resolved_backend(backend: str, device: torch.device) -> str:
    """``backend`` checked, and "auto" made concrete: triton on CUDA, torch otherwise (the
    rule for every fused loss)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _select_backend(backend: str, device: torch.device) -> ContrastiveBackend | None:
    backend = resolved_backend(backend, device)
    if backend == "torch":
        return torch_backend.BACKEND
    if backend == "triton":
        from megabatch.kernels import triton_backend  # imports triton only when asked for

        return triton_backend.BACKEND
    return None  # reference


def _check_backend_dtype(impl: ContrastiveBackend | None, x: torch.Tensor) -> None:
    if x.dtype == torch.float64 and impl is not None and not impl.supports_float64:
        raise ValueError(
            f"backend={impl.name!r} takes float32, bfloat16 or float16 features, got float64"
        )


def _check_group(name: str, process_group, backend: str) -> None:
    if process_group is not None and backend == "reference":
        raise ValueError(f"{name}: backend='reference' takes no process_group")
    if process_group is not None and not dist.is_initialized():
        raise ValueError(f"{name}: process_group given but torch.distributed is not initialised")


# --------------------------------------------------------------------------- public API
def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss over N (image, text) pairs, fused and tiled.

    image_features, text_features: (N, D), rows L2-normalised, fp32/bf16/fp16 (same dtype).
    logit_scale: the multiplier s (e.g. exp(t), t learnable); receives a gradient.
    Returns the fp32 scalar (CE(S, I) + CE(S^T, I)) / 2 with S = s * A B^T.

    process_group: with a group, each rank passes its local pairs; the result and every
    gradient equal those of one process holding all ranks' pairs concatenated in rank order.
    backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (tiled torch, the
    CPU path), "reference" (full logits; tests and benchmarks only), "auto" (triton on
    CUDA, torch otherwise).
    """
    _check_features("clip_loss", image_features, text_features)
    scale = _as_scale_tensor("logit_scale", logit_scale)
    impl = _select_backend(backend, image_features.device)
    _check_group("clip_loss", process_group, backend)
    _check_backend_dtype(impl, image_features)
    if impl is None:
        from megabatch.kernels.reference import clip_loss_reference

        return clip_loss_reference(image_features, text_features, scale.reshape(()))
    scale = scale.reshape(1).to(image_features.device, _scale_dtype(image_features))
    return _FusedContrastiveLoss.apply(
        image_features, text_features, scale, LossMode.CLIP, process_group, impl
    )


def ntxent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: z1[i] and z2[i] are positives, all else negatives.

    z1, z2: (N, D) projections of the two views, rows L2-normalised.
    temperature: tau > 0, a float or a scalar tensor (gets a gradient if it requires one).
    Returns the fp32 scalar mean over the 2N views of -log softmax_j(S_ij)[partner], with
    S = Z Z^T / tau over Z = [z1; z2] and j ranging over the 2N - 1 other views.

    process_group and backend: as for clip_loss.
    """
    _check_features("ntxent_loss", z1, z2)
    temp = _as_scale_tensor("temperature", temperature)
    if not bool((temp.detach() > 0).all()):
        raise ValueError(f"temperature must be > 0, got {float(temp.detach().reshape(()))}")
    impl = _select_backend(backend, z1.device)
    _check_group("ntxent_loss", process_group, backend)
    _check_backend_dtype(impl, z1)
    if impl is None:
        from megabatch.kernels.reference import ntxent_loss_reference

        return ntxent_loss_reference(z1, z2, temp.reshape(()))
    scale = (1.0 / temp).reshape(1).to(z1.device, _scale_dtype(z1))
    return _FusedContrastiveLoss.apply(z1, z2, scale, LossMode.NTXENT, process_group, impl)


def _stacked(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """[z1; z2] (2N, D). A view, no copy, when z2's rows directly follow z1's in one
    storage, as when both are halves of one (2N, D) tensor (the trainer's GradCache step
    lays them out so); otherwise a copy: 2N x D more memory (134 MB at N = 65,536, D = 512
    in bf16), the largest allocation of the triton backend's forward."""
    n = z1.shape[0]
    if (
        z1.untyped_storage().data_ptr() == z2.untyped_storage().data_ptr()
        and z1.stride() == z2.stride()
        and z2.storage_offset() == z1.storage_offset() + n * z1.stride(0)
    ):
        # A view of z1, so it shares z1's (and z2's: one base) in-place version counter.
        return z1.as_strided((2 * n, z1.shape[1]), z1.stride(), z1.storage_offset())
    return torch.cat([z1, z2])


def _scale_dtype(features: torch.Tensor) -> torch.dtype:
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def logits_flops(n: int, d: int) -> float:
    """Forward + backward FLOPs the benchmarks divide by: S, S again, dA, dB = 8 N^2 D."""
    return 8.0 * n * n * d


__all__ = ["clip_loss", "ntxent_loss", "logits_flops", "BACKENDS"]
