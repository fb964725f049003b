"""Kernel tests run the Triton kernels on CPU through Triton's interpreter when there is no
GPU. The switch is read when the kernels are defined, so it is set here, before any test
module imports them."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
