"""What a one-shot command (export, embed) prints on stderr: its own lines, one per
error, and none of its libraries' notices."""

from __future__ import annotations

import logging
import sys


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (libraries' messages often run on with
    tracebacks or hints), or its type's name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def quiet_libraries() -> None:
    """transformers' progress bars and notices off. DeepSpeed, which transformers imports
    when it is installed, is imported first with its warnings held back: on a machine
    without a GPU it logs "Setting accelerator to CPU. If you have GPU ...", misleading
    in a command that only reads checkpoints and runs the towers on the CPU."""
    if "deepspeed" not in sys.modules:
        logging.disable(logging.WARNING)
        try:
            import deepspeed  # noqa: F401
        except ImportError:  # transformers then does without it
            pass
        finally:
            logging.disable(logging.NOTSET)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
