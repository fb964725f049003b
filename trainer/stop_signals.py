"""SIGTERM, SIGUSR1 and SIGUSR2 (Slurm's warning before a time limit or preemption, as
``--signal=USR2@N`` sends it: USR2 because NCCL may take USR1): remembered from the moment a
command starts, so that one arriving while the run is still starting up is not lost
(the default action would kill the rank before it could say anything), and acted on by
the training loop: save at the end of the step, exit 75."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EXIT_REQUEUE = 75
"""sysexits' EX_TEMPFAIL: the exit status after a save on a stop signal (requeue the job
unchanged and it resumes). The job templates' requeue rules match it."""


class StopSignals:
    """``with StopSignals() as signals:`` handles them until the block ends (the handlers
    before it are put back: a command run in-process leaves its caller as it was)."""

    def __init__(self):
        self.received: str | None = None  # the name of the first stop signal, once one came
        self.on_receive: Callable[[], None] | None = None
        self._previous: dict = {}

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)
        return self

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name
        if self.on_receive is not None:
            self.on_receive()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """For the commands that write one thing atomically (export, embed) and have no step
    to finish: SIGTERM (a scheduler, ``kill``) raises SystemExit(143), so that the
    partial file or folder is removed on the way out, as for Ctrl-C."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
