"""kernels/ imports only torch and triton (DESIGN.md section 2)."""

import subprocess
import sys

CHECK = """
import sys
import megabatch.kernels
heavy = sorted(m for m in ("deepspeed", "webdataset") if m in sys.modules)
assert not heavy, f"importing kernels pulled in {heavy}"
print("ok")
"""


def test_kernels_does_not_import_deepspeed_or_webdataset():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
