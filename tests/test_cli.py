"""The megabatch command line: --version, env, and bad usage."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megabatch.trainer import __version__
from megabatch.trainer.cli import main

# The console script installed next to this interpreter by `pip install -e .`.
SCRIPT = Path(sys.executable).parent / "megabatch"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"megabatch {__version__}" in out
    assert torch.__version__ in out


def test_env_reports_versions_and_devices(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    cuda_line = next(line for line in out.splitlines() if line.startswith("cuda available"))
    assert cuda_line.split()[-1] == str(torch.cuda.is_available())
    for name in ("triton", "deepspeed", "webdataset", "accelerate", "prometheus-client"):
        assert name in out


def test_env_does_not_import_deepspeed():
    code = "import sys; from megabatch.trainer.cli import main; main(['env']); assert 'deepspeed' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv", [["--version"], ["env"]])
def test_console_script(argv):
    assert SCRIPT.exists(), f"{SCRIPT} missing: run `make install`"
    proc = subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout


def test_unknown_subcommand_fails(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code != 0
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_unknown_subcommand_fails():
    proc = subprocess.run([str(SCRIPT), "no-such-command"], capture_output=True, text=True)
    assert proc.returncode != 0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_after_the_command_is_done_does_not_kill_the_process(sig):
    # A scheduler's warning that lands in the interpreter's teardown (here: an exit hook
    # sends it) once the command has put its handlers back; a finished run exits 0.
    code = ("import atexit, os, signal, sys; "
            f"atexit.register(lambda: os.kill(os.getpid(), signal.{sig})); "
            "sys.argv = ['megabatch', 'env']; "
            "from megabatch.trainer.cli import run; run()")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
