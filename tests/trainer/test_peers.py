"""A rank that stops answering is named, within the collective timeout, instead of its
peers waiting for half an hour: heartbeats in the rendezvous store (megabatch.trainer.peers)."""

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from megabatch.trainer.peers import PeerLostError, PeerWatch
from tests.trainer.runs import ROOT, env, errors, overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store_port():
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=10),
                           wait_for_workers=False)  # fmt: skip
    yield port
    del server


def _watches(port, timeout_s=4.0):  # beats every second, stale after 3 s
    stalls = []
    watches = [PeerWatch(r, 2, timeout_s, "127.0.0.1", port, on_stall=lambda w, v: stalls.append(v))
               for r in range(2)]  # fmt: skip
    for watch in watches:
        watch.start()
    return watches, stalls


def test_a_silent_peer_is_named_and_a_slow_one_is_not(store_port):
    (zero, one), stalls = _watches(store_port)
    zero.phase(4, "step")
    one.phase(4, "data")
    time.sleep(2.5)  # a beat or two, with the new phases in them
    verdict = zero.verdict("rank 0 waits")
    assert not verdict.gone and "every rank is alive: rank 1 at step 5 (data" in verdict.message

    one.stop()  # its heartbeats stop, as a SIGSTOPped process's do
    deadline = time.monotonic() + 20
    while not stalls and time.monotonic() < deadline:
        time.sleep(0.1)
    (verdict,) = stalls  # rank 0's own watch saw its step outlast the timeout
    assert [h.rank for h in verdict.gone] == [1]
    assert "rank 1 stopped answering (last heartbeat" in verdict.message
    assert f"from {socket.gethostname()}, at step 5, data" in verdict.message
    assert not verdict.requeue
    zero.stop()


def test_an_exit_is_told_apart_and_waits_end_with_the_peer(store_port):
    (zero, one), _ = _watches(store_port, timeout_s=30)
    one.announce("eval-step3")
    zero.wait_for(1, "eval-step3")  # announced: returns at once

    one.exited(75, "SIGTERM while waiting for data")
    with pytest.raises(PeerLostError) as info:
        zero.wait_for(1, "eval-step6")
    assert info.value.verdict.requeue
    assert "rank 1 exited with status 75: SIGTERM while waiting for data" in str(info.value)
    zero.stop()


def _start_two_ranks(argv: list[str]) -> list[subprocess.Popen]:
    """``megabatch train ARGV`` as two ranks the way srun starts them (the environment
    names rank, world size and rank 0's address), stderr captured."""
    port, ranks = str(_free_port()), []
    for rank in (0, 1):
        rank_env = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                       LOCAL_RANK=str(rank), WORLD_SIZE="2")  # fmt: skip
        ranks.append(subprocess.Popen([sys.executable, "-m", "megabatch.trainer.cli", "train", *argv],
                                      cwd=ROOT, env=rank_env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return ranks


def test_a_stopped_rank_is_named_by_the_other(data, tmp_path):
    """Two ranks as srun starts them; rank 1 is SIGSTOPped after a few steps: rank 0
    stops within the timeout with a line naming rank 1 (it waited 30 minutes before)."""
    run = tmp_path / "run"
    extra = {"train.max_steps": 100000, "train.checkpoint_every_steps": "null",
             "train.collective_timeout_s": 6}  # fmt: skip
    ranks = []
    try:
        ranks = _start_two_ranks(overrides(data, run, **extra))
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and all(p.poll() is None for p in ranks):
            if metrics.exists() and metrics.read_text().count('"loss"') >= 3:
                break
            time.sleep(0.05)
        os.kill(ranks[1].pid, signal.SIGSTOP)
        # Bounded below the process group's own timeout (6 + 60 s): the watch must speak.
        status = ranks[0].wait(timeout=50)
        _, err = ranks[0].communicate()
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert status == 1, err[-3000:]
    (line,) = [e for e in errors(err) if "error" in e]
    assert line.startswith("megabatch: rank 0: error: rank 0 has waited")
    assert "rank 1 stopped answering (last heartbeat" in line


def test_a_peer_that_left_is_followed_within_beats_not_the_timeout(store_port):
    (zero, one), stalls = _watches(store_port, timeout_s=8.0)  # beats every 2 s
    zero.phase(2, "step")  # stuck in a collective with rank 1
    one.exited(2, "data.train: every shard unreadable")
    deadline = time.monotonic() + 7.5  # before zero's timeout would speak
    while not stalls and time.monotonic() < deadline:
        time.sleep(0.1)
    (verdict,) = stalls
    assert "rank 1 exited with status 2: data.train: every shard unreadable" in verdict.message
    assert "over train.collective_timeout_s" not in verdict.message
    zero.stop()


def test_a_data_error_on_one_rank_ends_both_with_its_reason(data, tmp_path):
    """Rank 1's share of the shards is one empty tar: it stops with the data error, and
    rank 0, left in a collective, says why instead of hanging."""
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    shards = f"[{data / 'train' / '00000.tar'}, {empty}]"
    procs = []
    try:
        extra = {"data.train": shards, "batch.accumulation_steps": 1}
        procs = _start_two_ranks(overrides(data, tmp_path / "run", **extra))
        outcomes = [(p.wait(timeout=90), p.communicate()[1]) for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    statuses = sorted(status for status, _ in outcomes)
    assert statuses == [1, 2], [err[-2000:] for _, err in outcomes]
    lines = [line for _, err in outcomes for line in errors(err)]
    (data_error,) = [line for line in lines if "no batch" in line and "exited" not in line]
    bad_rank = int(data_error.split("rank ")[1].split(":")[0])
    (follower,) = [line for line in lines if f"rank {bad_rank} exited with status 2" in line]
    assert "a collective failed (Connection closed by peer" in follower


def test_a_store_that_stops_answering_is_said_within_the_timeout(tmp_path):
    """The store's host stops without closing its connections (SIGSTOP here; a host cut
    off the network, in tests/trainer/test_multinode.py): TCPStore's own timeout does not
    end a call the server never answers, so the watch bounds its calls itself and says
    the store stopped answering, rather than waiting with its rank for ever."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", "import sys, time, datetime, torch.distributed as d;"
                               f"s = d.TCPStore('127.0.0.1', {port}, 2, True, wait_for_workers=False);"
                               "print('up', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout.readline() == "up\n"
        (zero, one), stalls = _watches(port)  # timeout 4 s: beats every second
        zero.phase(7, "step")
        os.kill(server.pid, signal.SIGSTOP)
        started = time.monotonic()
        while not stalls and time.monotonic() - started < 30:
            time.sleep(0.1)
        waited = time.monotonic() - started
        verdict = stalls[0] if stalls else None
        assert verdict is not None and not verdict.store_answered, "the watch hung on the store"
        assert "the rendezvous store at 127.0.0.1:" in verdict.message
        assert "does not answer" in verdict.message
        # The timeout, then one bounded read (2 beats, at least 5 s): not the store's 30 s.
        assert waited < 4 + 5 + 3, waited
        with pytest.raises(PeerLostError, match="does not answer"):
            one.wait_for(0, "eval-step7")  # the main thread's calls are bounded too
    finally:
        server.kill()
        server.wait()
