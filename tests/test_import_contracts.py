"""The import contracts in .importlinter catch what they promise to: each test copies the
code, adds one forbidden import, and expects lint-imports to fail naming that import.
(`make test` runs lint-imports on the real tree.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """lint-imports over a copy of the tree in which ``module`` (a path relative to the
    project root) ends with ``line``."""
    for folder in ("kernels", "data_pipeline", "trainer"):
        shutil.copytree(ROOT / folder, tmp_path / "megabatch" / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    if line:
        with (tmp_path / "megabatch" / module).open("a") as f:
            f.write(f"\n\ndef _added():\n    {line}\n")
    # The copy comes first on the path: its megabatch/ folder is a portion of the
    # namespace that shadows the editable install's.
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_copy_keeps_every_contract(tmp_path):
    proc = _lint(tmp_path, "", "")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "named"),
    [
        ("kernels/reference.py", "from megabatch.trainer import config",
         "kernels import nothing of ours", "megabatch.kernels.reference -> megabatch.trainer.config"),
        ("data_pipeline/limits.py", "import megabatch.trainer.metrics",
         "the data pipeline does not import the trainer",
         "megabatch.data_pipeline.limits -> megabatch.trainer.metrics"),
        ("data_pipeline/write/writer.py", "from megabatch.data_pipeline.read import loader",
         "data pipeline: the CLI and benchmark on top",
         "megabatch.data_pipeline.write.writer -> megabatch.data_pipeline.read.loader"),
        ("data_pipeline/errors.py", "from megabatch.data_pipeline.write import writer",
         "data pipeline: the CLI and benchmark on top",
         "megabatch.data_pipeline.errors -> megabatch.data_pipeline.write.writer"),
        ("trainer/config.py", "from megabatch.trainer import train",
         "no import cycles", "cycles are allowed in megabatch.trainer. It could be made "
         "acyclic by removing 1 dependency: - .config -> .train"),
    ],
    ids=["kernels-import-trainer", "data-imports-trainer", "write-imports-read",
         "shared-imports-write", "cycle"],
)  # fmt: skip
def test_a_forbidden_import_fails_naming_it(tmp_path, module, line, contract, named):
    proc = _lint(tmp_path, module, line)
    assert proc.returncode != 0, proc.stdout
    broken = proc.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, proc.stdout
    assert named in " ".join(broken.split()), proc.stdout
