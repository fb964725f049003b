"""The wheel installs one top-level import name, ``megabatch``, and every module of ours.

Before the namespace, the wheel's top-level packages were ``kernels``, ``trainer`` and
``data_pipeline``: installing it beside Hugging Face's ``kernels`` or Coqui's ``trainer``
overwrote their files. ``make check-coexistence`` installs it beside both for real.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("trainer", "kernels", "data_pipeline", "deploy")  # installed as megabatch.<folder>


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out, tree = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("tree")
    # From a copy: setuptools would reuse the checkout's build/lib, stale files included.
    for name in ("pyproject.toml", "README.md", *FOLDERS):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tree / name)
    # --no-build-isolation: setuptools comes from the venv, so no index is needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(out), str(tree)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (path,) = out.glob("megabatch-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _names(wheel: zipfile.ZipFile) -> list[str]:
    return [name for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")]


@pytest.mark.slow
def test_megabatch_is_the_only_top_level_import_name(wheel):
    assert {name.split("/")[0] for name in _names(wheel)} == {"megabatch"}
    (top_level,) = [n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["megabatch"]
    # An implicit namespace: no megabatch/__init__.py that another distribution could own.
    assert "megabatch/__init__.py" not in wheel.namelist()


@pytest.mark.slow
def test_every_module_preset_and_job_template_is_in_the_wheel(wheel):
    # pyproject.toml lists the packages one by one; a subpackage left off that list would
    # be missing from installs while the editable checkout still imports it.
    ours = {
        f"megabatch/{path.relative_to(ROOT).as_posix()}"
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".yaml", ".sbatch") and "__pycache__" not in path.parts
    }
    assert ours, "no modules found"
    packed = {name for name in _names(wheel) if name.endswith((".py", ".yaml", ".sbatch"))}
    assert not sorted(ours - packed), f"left out of the wheel: {sorted(ours - packed)}"
    assert not sorted(packed - ours), f"in the wheel, not in the tree: {sorted(packed - ours)}"


@pytest.mark.slow
def test_the_console_script_points_into_the_namespace(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "megabatch = megabatch.trainer.cli:run" in wheel.read(entry_points).decode()
