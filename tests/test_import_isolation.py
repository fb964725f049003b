"""kernels/ imports only torch and triton (docs/ARCHITECTURE.md, "Rules that the layout
enforces"), and triton only when the triton backend is asked for."""

import subprocess
import sys

CHECK = """
import sys
import megabatch.kernels
heavy = sorted(m for m in ("deepspeed", "webdataset") if m in sys.modules)
assert not heavy, f"importing kernels pulled in {heavy}"
print("ok")
"""

LAZY_TRITON = """
import sys
import torch
import megabatch.kernels
assert "triton" not in sys.modules, "importing kernels pulled in triton"
a = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
megabatch.kernels.clip_loss(a, a, 10.0, backend="torch")
megabatch.kernels.ntxent_loss(a, a, 0.1, backend="torch")
assert "triton" not in sys.modules, "the torch backend pulled in triton"
import megabatch.kernels.triton_backend
assert "triton" in sys.modules
heavy = sorted(m for m in ("deepspeed", "webdataset") if m in sys.modules)
assert not heavy, f"the triton backend pulled in {heavy}"
print("ok")
"""


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_kernels_does_not_import_deepspeed_or_webdataset():
    _run(CHECK)


def test_kernels_imports_triton_only_for_the_triton_backend():
    _run(LAZY_TRITON)
