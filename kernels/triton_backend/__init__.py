"""The Triton backend: fused kernels for the two primitives of megabatch.kernels.backend.

    common.py        jit helpers, autotune-config helpers and device helpers the passes share
    forward.py       row_logsumexp: _row_logsumexp_kernel, its configs, its launcher
    backward.py      row_gradient: _row_gradient_kernel, its configs, its launcher
    backward_tma.py  experimental backward through TMA and warp specialisation
                     (MEGABATCH_TRITON_WS=1)

Importing this package imports triton; megabatch.kernels.contrastive imports it only when
backend="triton" is asked for. On CPU tensors the kernels run under Triton's interpreter,
which must be switched on with TRITON_INTERPRET=1 before this package is imported (the
kernel tests do this in tests/kernels/conftest.py).
"""

from megabatch.kernels.backend import ContrastiveBackend
from megabatch.kernels.triton_backend.backward import row_gradient
from megabatch.kernels.triton_backend.forward import row_logsumexp


class _TritonBackend:
    """ContrastiveBackend in Triton: CUDA, or CPU under the interpreter; no fp64."""

    name = "triton"
    # dL/dY from the row pass would need atomics across programs; CLIP runs a second pass.
    supports_column_gradient = False
    supports_float64 = False
    row_logsumexp = staticmethod(row_logsumexp)
    row_gradient = staticmethod(row_gradient)


BACKEND: ContrastiveBackend = _TritonBackend()

__all__ = ["BACKEND", "row_gradient", "row_logsumexp"]
