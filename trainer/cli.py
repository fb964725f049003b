"""The ``megabatch`` command line."""

import argparse
import os
import platform
import signal
import sys
from collections.abc import Sequence
from importlib import metadata

from megabatch.data_pipeline.cli import add_data_commands
from megabatch.trainer import __version__
from megabatch.trainer.commands import add_train_commands
from megabatch.trainer.compare import add_compare_command
from megabatch.trainer.embed import add_embed_command
from megabatch.trainer.export import add_export_command
from megabatch.trainer.status import add_status_command
from megabatch.trainer.stop_signals import STOP_SIGNALS
from megabatch.trainer.submit import add_submit_command
from megabatch.trainer.torchrun import add_launch_command, launch, record_exit_status

# Distributions reported by `megabatch env`, by their installed (PyPI) names.
_REPORTED_PACKAGES = (
    "torch",
    "triton",
    "deepspeed",
    "webdataset",
    "accelerate",
    "prometheus-client",
    "numpy",
    "pillow",
    "scikit-learn",
    "pyarrow",
    "transformers",
    "tokenizers",
    "kornia",
    "onnx",
    "onnxruntime",
)
# Environment variables that change how the distributed stack behaves.
_REPORTED_ENV = ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")


def _installed_version(name: str) -> str:
    # Read from the package metadata, so that reporting never imports the package
    # (importing deepspeed is slow and probes the hardware).
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _version_line() -> str:
    return (
        f"megabatch {__version__} (torch {_installed_version('torch')}, "
        f"python {platform.python_version()})"
    )


def _row(label: str, value: object) -> str:
    return f"{label:<21} {value}"


def _env_report() -> list[str]:
    lines = [
        _row("megabatch", __version__),
        _row("python", f"{platform.python_version()} ({sys.executable})"),
        _row("platform", platform.platform()),
    ]
    lines += [_row(name, _installed_version(name)) for name in _REPORTED_PACKAGES]

    try:
        import torch
    except ImportError as exc:
        lines.append(_row("torch import", f"failed: {exc}"))
    else:
        lines.append(_row("torch CUDA build", torch.version.cuda or "none (CPU build)"))
        available = torch.cuda.is_available()
        lines.append(_row("cuda available", available))
        if available:
            for i in range(torch.cuda.device_count()):
                lines.append(_row(f"cuda device {i}", torch.cuda.get_device_name(i)))

    lines += [_row(var, os.environ.get(var, "(unset)")) for var in _REPORTED_ENV]
    return lines


def _cmd_env(args: argparse.Namespace) -> int:
    print("\n".join(_env_report()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megabatch",
        description="Distributed large-batch contrastive and self-supervised pretraining (CLIP, "
        "SimCLR, MoCo v3, BYOL, pretext tasks).",
    )
    parser.add_argument("--version", action="version", version=_version_line())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    env = commands.add_parser(
        "env", help="print versions and devices (paste this into bug reports)"
    )
    env.set_defaults(func=_cmd_env)
    add_data_commands(commands)
    add_train_commands(commands)
    add_status_command(commands)
    add_export_command(commands)
    add_compare_command(commands)
    add_embed_command(commands)
    add_launch_command(commands)
    add_submit_command(commands)
    return parser


def _exit_status(code: object) -> int:
    """The status a process exiting with ``sys.exit(code)`` has: None is 0, an integer is
    taken modulo 256, anything else (a message) is 1."""
    if code is None:
        return 0
    return code & 0xFF if isinstance(code, int) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status (argparse exits 2 on bad usage).

    Under ``megabatch launch`` (MEGABATCH_EXIT_DIR set) every rank records that status for
    the launcher on its way out, whatever the exit path: a returned status, SystemExit,
    Ctrl-C (130) or an exception (1). Only a killed process records nothing."""
    status = 1  # an uncaught exception: Python exits 1
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["launch"]:
            # Straight to the launcher: argparse's REMAINDER cannot take the torchrun
            # options that come before COMMAND.
            code = launch(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            code = args.func(args)
        status = _exit_status(code)
        return code
    except SystemExit as exc:
        status = _exit_status(exc.code)
        raise
    except KeyboardInterrupt:
        status = 128 + signal.SIGINT  # 130, as a shell reports the SIGINT Python then dies of
        raise
    finally:
        record_exit_status(status)


def run() -> None:
    """The process entry point (the ``megabatch`` command, ``python -m
    megabatch.trainer.cli``): ``main``, then exit with its status. A stop signal that comes
    once the command is done (a scheduler's warning during the interpreter's teardown,
    after the handlers were put back) is ignored: there is nothing left to save, and dying
    of it would turn a finished run's 0 into the signal's status."""
    status = main()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    run()
