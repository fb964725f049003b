"""SigLIP's backend in Triton: the two launchers of sigmoid_forward.py and
sigmoid_backward.py as one kernels.siglip.SigmoidBackend (CUDA, or CPU under the
interpreter; no fp64)."""

from megabatch.kernels.triton_backend.sigmoid_backward import pairwise_sigmoid_gradient
from megabatch.kernels.triton_backend.sigmoid_forward import pairwise_sigmoid_loss


class _TritonSigmoidBackend:
    name = "triton"
    # dL/dY from the row pass would need atomics across programs: a second pass instead.
    supports_column_gradient = False
    supports_float64 = False
    pairwise_sigmoid_loss = staticmethod(pairwise_sigmoid_loss)
    pairwise_sigmoid_gradient = staticmethod(pairwise_sigmoid_gradient)


BACKEND = _TritonSigmoidBackend()

__all__ = ["BACKEND", "pairwise_sigmoid_gradient", "pairwise_sigmoid_loss"]
