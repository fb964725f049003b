"""The loader's DataLoader workers leave SIGTERM, SIGUSR1 and SIGUSR2 to their rank (schedulers
signal the whole process tree), yet still end with the loader's shutdown and with the
rank. Each test runs a rank as a process of its own, in a session of its own so that
signalling its process group reaches nothing else, and kills whatever is left."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PRELUDE = """
import json, multiprocessing, os, signal, sys, time
from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.transforms import ImageConfig

# 120 samples in batches of 4, one batch ahead per worker: the workers are busy making
# batches (or starting) when the signals come.
loader = ShardLoader(LoaderConfig(shards=sys.argv[1], captions=False, batch_size=4,
                                  num_workers=2, prefetch_factor=1, pin_memory=False,
                                  image=ImageConfig(size=16)))
"""

_SIGNALLED_EPOCHS = (
    _PRELUDE
    + """
import threading

received = set()  # what the trainer's handlers do: note the signal, carry on
for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(signum, lambda s, frame: received.add(signal.Signals(s).name))
stop = threading.Event()

def signal_the_tree():  # this rank and its workers, as a scheduler does, every 2 ms
    while not stop.wait(0.002):
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            os.killpg(0, signum)

threading.Thread(target=signal_the_tree).start()
epochs = []
try:
    for epoch in range(3):  # each starts its workers afresh: signalled while starting too
        keys = [key for batch in loader for key in batch.keys]
        epochs.append([len(keys), len(set(keys))])
finally:
    stop.set()
epoch_end = [w.exitcode for w in multiprocessing.active_children()]  # joined: none left

iterator = iter(loader)
next(iterator)
early = multiprocessing.active_children()
iterator.close()  # dropped after one batch
print(json.dumps({"epochs": epochs, "received": sorted(received), "left": epoch_end,
                  "early_workers": len(early), "early_end": [w.exitcode for w in early],
                  "left_after_drop": len(multiprocessing.active_children())}))
"""
)

_RANK_THAT_DIES = """
import json, multiprocessing, sys, time
from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.transforms import ImageConfig

# Each worker's command streams a shard, then hangs: once it has made its batches the
# worker is stuck in a read, where torch's watchdog (it looks between batches) never runs.
spec = [f"pipe:exec 2>/dev/null; cat {sys.argv[1]}/0000{i}.tar; sleep 600" for i in range(2)]
loader = ShardLoader(LoaderConfig(shards=spec, captions=False, batch_size=4, num_workers=2,
                                  prefetch_factor=1, pin_memory=False, shuffle_block=1,
                                  image=ImageConfig(size=16)))
iterator = iter(loader)
next(iterator)
print(json.dumps([w.pid for w in multiprocessing.active_children()]), flush=True)
time.sleep(120)  # holding its workers, until the test kills it
"""


_STUCK_WORKERS = """
import json, multiprocessing, sys
import torch.utils.data._utils as torch_data_utils
from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
from megabatch.data_pipeline.read.transforms import ImageConfig

torch_data_utils.MP_STATUS_CHECK_INTERVAL = 0.5  # the shutdown's join timeouts (5 s)
# Each worker's command streams a shard, then never exits: the worker makes its batches,
# then waits for the command for good. (Its stderr is not this process's: the test reads
# that to its end.)
spec = [f"pipe:exec 2>/dev/null; cat {sys.argv[1]}/0000{i}.tar; sleep 600" for i in range(2)]
loader = ShardLoader(LoaderConfig(shards=spec, captions=False, batch_size=4, num_workers=2,
                                  prefetch_factor=1, pin_memory=False, shuffle_block=1,
                                  image=ImageConfig(size=16)))
iterator = iter(loader)
next(iterator)
workers = multiprocessing.active_children()
iterator.close()
print(json.dumps({"workers": len(workers), "exitcodes": [w.exitcode for w in workers],
                  "left": len(multiprocessing.active_children())}))
"""


_EXIT_MID_EPOCH = (
    _PRELUDE
    + """
batches = iter(loader)
next(batches)
print(json.dumps([w.pid for w in multiprocessing.active_children()]), flush=True)
sys.exit(75)  # the trainer's requeue exit, its batch iterator still alive
"""
)


def _start(script: str, shards: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, str(shards)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_workers_ignore_sigterm_sigusr1_sigusr2_and_the_epoch_completes(shards):
    proc = _start(_SIGNALLED_EPOCHS, shards)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        _kill_session(proc)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["received"] == ["SIGTERM", "SIGUSR1", "SIGUSR2"]  # the rank got them
    assert result["epochs"] == [[120, 120]] * 3  # every batch of every epoch
    assert result["left"] == []  # each epoch's workers gone at its end
    # Dropped after one batch, the workers end on the loader's own shutdown path: exit
    # status 0, not a signal.
    assert result["early_workers"] == 2 and result["early_end"] == [0, 0]
    assert result["left_after_drop"] == 0


def test_workers_end_when_their_rank_dies(shards):
    proc = _start(_RANK_THAT_DIES, shards)
    pids: list[int] = []
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the rank did not start its workers within 60 s"
        pids = json.loads(proc.stdout.readline() or "[]")
        assert len(pids) == 2, proc.stderr.read() if proc.poll() is not None else pids
        proc.kill()  # SIGKILL: no handler, no shutdown path; the kernel ends the workers
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if _running(pid)]
    finally:
        for pid in pids:  # should there be survivors
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        _kill_session(proc)


def test_a_worker_stuck_past_the_shutdown_is_killed_not_left(shards):
    # torch's last resort is SIGTERM, which the workers ignore.
    proc = _start(_STUCK_WORKERS, shards)
    try:
        out, err = proc.communicate(timeout=90)
        # What is left of the session: the workers' commands (sh, sleep), which must not
        # have inherited the workers' indifference to SIGTERM, SIGUSR1 and SIGUSR2.
        commands = _session_processes(proc.pid)
        ignored = {pid: _ignored_signals(pid) for pid in commands}
    finally:
        _kill_session(proc)  # and the commands' `sleep 600` with it
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result == {"workers": 2, "exitcodes": [-signal.SIGKILL] * 2, "left": 0}
    assert len(commands) >= 2
    assert not {
        pid: s for pid, s in ignored.items() if s & {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
    }


def _session_processes(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _running(int(entry.name)):
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            if int(fields[3]) == session:  # the stat fields after state: ppid, pgrp, session
                pids.append(int(entry.name))
    return pids


def _ignored_signals(pid: int) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(
        next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16
    )
    return {signum for signum in range(1, 64) if mask & (1 << (signum - 1))}


def test_a_rank_exiting_mid_epoch_exits_and_takes_its_workers(shards):
    # multiprocessing's exit hook SIGTERMs daemonic children, then waits for them.
    proc = _start(_EXIT_MID_EPOCH, shards)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        _kill_session(proc)
    assert proc.returncode == 75, err
    pids = json.loads(out)
    assert len(pids) == 2 and not [pid for pid in pids if _running(pid)]
