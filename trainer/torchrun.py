"""``megabatch launch``: torchrun as a child process, with an exit status a scheduler can use.

The trainer exits 75 (EX_TEMPFAIL) after a signal-triggered save so that the job is
requeued, but torchrun reports any rank's non-zero exit as its own status 1, dies of
SIGUSR1 and SIGUSR2 (Slurm's warnings before preemption, which it does not handle by default) and
SIGKILLs the ranks 30 s after forwarding a SIGTERM. This launcher runs

    python -m torch.distributed.run [--standalone] --signals-to-handle=...,SIGUSR1,SIGUSR2
        --shutdown-timeout=300 TORCHRUN-OPTIONS -m megabatch.trainer.cli COMMAND ARGS

(each added option only where the user gave none), forwards the signals it gets to
torchrun, and exits with the ranks' own status: every rank records it in
``$MEGABATCH_EXIT_DIR/rank<RANK>`` (``megabatch.trainer.cli.main`` calls ``record_exit_status`` on
every exit path) and, if the ranks that recorded one agree, that is the launcher's;
otherwise torchrun's. A rank killed before it could record (torchrun stops the others
once one has failed) does not count: it did not get to say.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_DIR_ENV = "MEGABATCH_EXIT_DIR"
COMMANDS = ("train", "eval")  # the megabatch commands that run on every rank
# What reaches the launcher and is passed on: Kubernetes' and scancel's SIGTERM, Ctrl-C,
# Slurm's --signal=USR2@N (or USR1@N) warning, a closed terminal.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
# torchrun's default list plus SIGUSR1 and SIGUSR2: signals torchrun does not handle kill it.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"
# Seconds torchrun waits for the ranks after forwarding a signal, then SIGKILLs them:
# enough for the step in progress and a checkpoint save (torchrun's own default is 30).
DEFAULT_SHUTDOWN_TIMEOUT_S = 300
# torchrun options (their argparse dests) that choose the rendezvous: with none of them
# the launcher adds --standalone (a local rendezvous on a free port).
_RENDEZVOUS_DESTS = frozenset({"nnodes", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "standalone",
                               "master_addr", "master_port", "node_rank"})  # fmt: skip
# torchrun options that name what the ranks run: the launcher's own (-m megabatch.trainer.cli).
_SCRIPT_DESTS = frozenset({"module", "no_python", "run_path"})
# Seconds torchrun has to exit once every rank of this node has recorded a failure: its
# shutdown calls the rendezvous store, and a store whose host was lost without a word
# (cut off, powered off) never answers, so torchrun would wait with no end.
TORCHRUN_AFTER_RANKS_S = 30.0
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h

USAGE = "megabatch launch [TORCHRUN OPTIONS] COMMAND [ARGS]"
DESCRIPTION = f"""\
Run a megabatch command on this node's ranks under torchrun, as
  python -m torch.distributed.run TORCHRUN-OPTIONS -m megabatch.trainer.cli COMMAND ARGS
COMMAND is {" or ".join(COMMANDS)}, ARGS its own arguments (megabatch COMMAND --help).
Example: megabatch launch --nproc-per-node=8 train run.yaml optim.lr=3e-4

Added to TORCHRUN OPTIONS unless given there (or as torchrun's PET_* variables):
  --standalone            when no --nnodes, --rdzv-*, --master-* or --node-rank is given
  --signals-to-handle={SIGNALS_TO_HANDLE}
                          torchrun's default plus SIGUSR1 and SIGUSR2 (Slurm's warnings);
                          a list of your own must include SIGTERM, SIGINT, SIGHUP,
                          SIGUSR1 and SIGUSR2
  --shutdown-timeout={DEFAULT_SHUTDOWN_TIMEOUT_S}  seconds torchrun gives the ranks to end the
                          step and save before SIGKILL; keep it below the scheduler's grace
                          period (Slurm KillWait, Kubernetes terminationGracePeriodSeconds)

Signals: SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and SIGHUP sent to this process (or to every process
of the job, as scancel does) are forwarded to torchrun and by it to the ranks; after
SIGTERM, SIGUSR1 or SIGUSR2 they save at the end of the step and exit 75. The launcher exits only
after torchrun, and after any rank that outlives torchrun. Once every rank of this node
has recorded a failure, torchrun gets {TORCHRUN_AFTER_RANKS_S:g} s more to exit (it may wait for
a rendezvous store whose host was lost) and is then killed.

Exit status: each rank records its own; if the ranks that recorded one agree, that one
(0 done; 75 saved after a signal: requeue the job unchanged and it resumes; 2 bad config
or input; 1 failed). A rank killed before it could record does not count; with no
record, or records that disagree, torchrun's (1 when a rank failed). 2 for bad usage of
the launcher itself."""
_HELP_FORMAT = {"usage": USAGE, "description": DESCRIPTION,
                "formatter_class": argparse.RawDescriptionHelpFormatter}  # fmt: skip


class LaunchUsageError(ValueError):
    """Bad ``megabatch launch`` arguments; the message is one line."""


@dataclass(frozen=True)
class LaunchPlan:
    torchrun_args: list[str]  # after `python -m torch.distributed.run`
    local_world_size: int  # this node's ranks: how many exit statuses to expect


# ---------------------------------------------------------------- the command line
def add_launch_command(commands: argparse._SubParsersAction) -> None:
    """Register ``launch`` for ``megabatch --help`` and ``megabatch launch --help``.
    ``megabatch.trainer.cli.main`` hands ``launch``'s arguments to ``launch()`` before argparse
    sees them: argparse's REMAINDER cannot take the torchrun options before COMMAND."""
    parser = commands.add_parser(
        "launch", help="run train/eval under torchrun; exit 75 survives a requeue", **_HELP_FORMAT
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=lambda args: launch(args.argv))


class _HelpRequested(Exception):
    pass


def launch(argv: Sequence[str]) -> int:
    """``megabatch launch ARGV``; returns the exit status (2 for bad usage)."""
    try:
        if argv[:1] in (["-h"], ["--help"]):
            raise _HelpRequested  # before importing torch for its option table
        plan = plan_launch(argv)
    except _HelpRequested:
        argparse.ArgumentParser(prog="megabatch launch", **_HELP_FORMAT).print_help()
        return 0
    except LaunchUsageError as exc:
        print(f"megabatch launch: error: {exc}", file=sys.stderr)
        return 2
    return run_torchrun(plan)


def plan_launch(argv: Sequence[str]) -> LaunchPlan:
    """Split ARGV into torchrun's options and COMMAND ARGS, add the launcher's defaults,
    and check the whole torchrun command line with torchrun's own parser (which also reads
    its PET_* environment variables)."""
    from torch.distributed.run import determine_local_world_size, get_args_parser

    env, parser = os.environ, get_args_parser()
    user_options, given, rest = _split_torchrun_options(argv, parser._option_string_actions)
    given |= {dest for dest in _all_dests(parser) if f"PET_{dest.upper()}" in env}
    if not rest:
        raise LaunchUsageError(f"missing COMMAND ({' or '.join(COMMANDS)}); usage: {USAGE}")
    if rest[0] not in COMMANDS:
        raise LaunchUsageError(
            f"unknown command {rest[0]!r} (choose from {', '.join(COMMANDS)}); usage: {USAGE}"
        )
    if given & _SCRIPT_DESTS:
        names = ", ".join("--" + dest.replace("_", "-") for dest in sorted(given & _SCRIPT_DESTS))
        raise LaunchUsageError(
            f"{names}: the launcher runs -m megabatch.trainer.cli COMMAND itself"
        )

    added = []
    if not given & _RENDEZVOUS_DESTS:
        added.append("--standalone")
    if "signals_to_handle" not in given:
        added.append(f"--signals-to-handle={SIGNALS_TO_HANDLE}")
    if "shutdown_timeout" not in given and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in env:
        added.append(f"--shutdown-timeout={DEFAULT_SHUTDOWN_TIMEOUT_S}")
    torchrun_args = [*added, *user_options, "-m", "megabatch.trainer.cli", *rest]

    def refuse(message: str):
        raise LaunchUsageError(f"torchrun option: {message}")

    parser.error = refuse  # one line instead of torchrun's usage text and exit 2
    options = parser.parse_args(torchrun_args)
    handled = {name.strip() for name in options.signals_to_handle.split(",")}
    missing = [sig.name for sig in FORWARDED_SIGNALS if sig.name not in handled]
    if missing:
        raise LaunchUsageError(
            f"--signals-to-handle must include {','.join(missing)}: the launcher forwards "
            "them to torchrun, which dies of a signal it does not handle"
        )
    try:
        local_world_size = determine_local_world_size(options.nproc_per_node)
    except ValueError as exc:
        raise LaunchUsageError(f"--nproc-per-node={options.nproc_per_node}: {exc}") from None
    return LaunchPlan(torchrun_args, local_world_size)


def _split_torchrun_options(argv: Sequence[str], actions: dict[str, argparse.Action]):
    """``[--opt=v, --opt v, --flag, COMMAND, ARGS...]`` -> (the option tokens, the dests
    given, [COMMAND, ARGS...]). Options must be spelt in full (no abbreviations)."""
    options, given, i = [], set(), 0
    while i < len(argv) and argv[i].startswith("-"):
        token = argv[i]
        if token in ("-h", "--help"):
            raise _HelpRequested
        name, inline_value = token.split("=", 1)[0], "=" in token
        action = actions.get(name)
        if action is None and not token.startswith("--") and actions.get(token[:2]):
            name, action, inline_value = token[:2], actions[token[:2]], True  # -r3
        if action is None:
            raise LaunchUsageError(
                f"unknown torchrun option {name} (see python -m torch.distributed.run --help)"
            )
        takes_value = action.nargs != 0
        if inline_value and not takes_value:
            raise LaunchUsageError(f"torchrun option {name} takes no value")
        options.append(token)
        if takes_value and not inline_value:
            if i + 1 == len(argv):
                raise LaunchUsageError(f"torchrun option {name} needs a value")
            i += 1
            options.append(argv[i])
        given.add(action.dest)
        i += 1
    return options, given, list(argv[i:])


def _all_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.option_strings}


# ---------------------------------------------------------------- exit statuses
def exit_status_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}"


def record_exit_status(status: int) -> None:
    """Write this rank's exit status for the launcher, if one is listening: atomically
    (written aside, then renamed), so that the launcher never reads half a number."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    try:
        rank = int(os.environ.get("RANK", "0"))
        path = exit_status_path(folder, rank)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(f"{status}\n")
        os.replace(partial, path)
    except (OSError, ValueError) as exc:  # the launcher then falls back to torchrun's status
        print(f"megabatch: warning: exit status {status} not recorded: {exc}", file=sys.stderr)


def read_exit_statuses(folder: str | Path) -> dict[int, int]:
    """{rank: status} of the ranks that recorded one."""
    statuses = {}
    for path in Path(folder).glob("rank*"):
        try:
            statuses[int(path.name[len("rank") :])] = int(path.read_text())
        except (OSError, ValueError):
            continue  # not one of ours
    return statuses


def launcher_exit_status(statuses: dict[int, int], torchrun: int) -> int:
    """The ranks that recorded a status agree: that one. A rank that recorded nothing
    was killed before it could (by torchrun, once another rank had failed; by the
    kernel) and has no say. No record, or records that disagree: torchrun's."""
    values = set(statuses.values())
    return values.pop() if len(values) == 1 else torchrun


# ---------------------------------------------------------------- the child
class _SignalForwarder:
    """Passes each forwarded signal to torchrun while it runs, then to any rank that
    outlived it (re-parented to the launcher, see _become_subreaper)."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.orphans: set[int] = set()
        self.pending: list[int] = []  # arrived before torchrun started
        self._previous = {}

    def __enter__(self):
        for sig in FORWARDED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def started(self, child: subprocess.Popen) -> None:
        self.child = child
        for signum in self.pending:
            self._forward(signum, None)

    def _forward(self, signum, frame) -> None:
        if self.child is None:
            self.pending.append(signum)
            return
        targets = [self.child.pid] if self.child.returncode is None else sorted(self.orphans)
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def run_torchrun(plan: LaunchPlan) -> int:
    """Start torchrun, forward signals, wait for it and for every rank, return the status."""
    exit_dir = tempfile.mkdtemp(prefix="megabatch-exit-")  # private: mode 0700
    # Handlers stay until the status is known: a late signal must not kill the launcher.
    with _SignalForwarder() as forwarder:
        try:
            _become_subreaper()
            env = {**os.environ, EXIT_DIR_ENV: exit_dir}
            command = [sys.executable, "-m", "torch.distributed.run", *plan.torchrun_args]
            # Its own process group: a terminal's Ctrl-C reaches the launcher only, and is
            # forwarded once (torchrun abandons the ranks on a third SIGINT or SIGTERM).
            child = subprocess.Popen(command, env=env, process_group=0)
            forwarder.started(child)
            code = _wait_for_torchrun(child, exit_dir, plan.local_world_size)
            torchrun = 128 - code if code < 0 else code  # killed by signal N: 128 + N
            _wait_for_orphans(forwarder, torchrun)
            statuses = read_exit_statuses(exit_dir)
        finally:
            shutil.rmtree(exit_dir, ignore_errors=True)
    status = launcher_exit_status(statuses, torchrun)
    if status != torchrun:
        print(f"megabatch launch: {len(statuses)} of {plan.local_world_size} ranks recorded "
              f"{status}, none another; exiting {status} (torchrun exited {torchrun})",
              file=sys.stderr)  # fmt: skip
    elif status != 0:
        recorded = ", ".join(f"rank {r}: {s}" for r, s in sorted(statuses.items())) or "none"
        print(f"megabatch launch: exit statuses the {plan.local_world_size} ranks recorded: "
              f"{recorded}; exiting with torchrun's {torchrun}", file=sys.stderr)  # fmt: skip
    return status


def _wait_for_torchrun(child: subprocess.Popen, exit_dir: str, local_world_size: int) -> int:
    """torchrun's exit code; SIGKILLed (with its process group) when it outlives this
    node's ranks by TORCHRUN_AFTER_RANKS_S after they all recorded a failure. Not after a
    success: then torchrun waits for the other nodes to finish (its exit barrier)."""
    failed_since = None
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        statuses = read_exit_statuses(exit_dir)
        if len(statuses) < local_world_size or 0 in statuses.values():
            continue
        failed_since = failed_since or time.monotonic()
        if time.monotonic() - failed_since > TORCHRUN_AFTER_RANKS_S:
            print(f"megabatch launch: torchrun did not exit within {TORCHRUN_AFTER_RANKS_S:g} s "
                  "of its ranks (its rendezvous store may be unreachable); stopped it",
                  file=sys.stderr, flush=True)  # fmt: skip
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return child.wait()


def _wait_for_orphans(forwarder: _SignalForwarder, torchrun: int) -> None:
    """Ranks still alive when torchrun exits (it was killed, or gave up on them) are
    re-parented to the launcher: wait for them too (signals now go to them), so that none
    is left behind. Processes re-parented later (a dead rank's helpers) are reaped on the
    way but not waited for."""
    forwarder.orphans.update(_child_pids())
    if forwarder.orphans:
        print(f"megabatch launch: torchrun exited {torchrun} before processes "
              f"{sorted(forwarder.orphans)}; waiting for them", file=sys.stderr)  # fmt: skip
    while forwarder.orphans:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        forwarder.orphans.discard(pid)


def _become_subreaper() -> None:
    """Linux: orphaned descendants come to this process instead of init."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child_pids() -> list[int]:
    """This process's children, from /proc (Linux; empty elsewhere)."""
    me, children = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            children.append(int(entry))
    return children


__all__ = [
    "EXIT_DIR_ENV", "LaunchPlan", "LaunchUsageError", "add_launch_command", "launch",
    "launcher_exit_status", "plan_launch", "read_exit_statuses", "record_exit_status",
]  # fmt: skip
