"""Multi-node for real: two hosts made of network namespaces (tests/hosts.py), one CPU
rank on each, started as a user starts a multi-node job: ``megabatch launch`` (torchrun)
on every host with a c10d rendezvous on the first host's address.

- The contrastive batch spans both hosts, and the run trains exactly as the same run on
  one host with the same world size: losses and final parameters equal to the bit
  (torch.equal). Same ranks, same data per rank, and gloo's all-reduce and all-gather of
  2 ranks combine in an order fixed by rank, not by the transport: no tolerance is needed,
  so none is given.
- A host lost without a word (its link cut, then its processes killed: no TCP reset
  reaches the survivor, as when a machine loses power), whichever host it is: the
  survivor exits 1 within a bounded time, with a line saying which peer was lost (or that
  the rendezvous store's host was), and the same commands run again resume from the last
  complete checkpoint and end with the uninterrupted run's parameters.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import hosts
from tests.real_parts import needs
from tests.trainer.runs import ROOT, env, errors, overrides, train, weights

pytestmark = [
    needs("netns", hosts.missing()),
    pytest.mark.slow,
    pytest.mark.multiproc,
]
STEPS = 40  # several seconds of steps: a host is lost mid-run
CHECKPOINT_EVERY = 3
COLLECTIVE_TIMEOUT_S = 10
RENDEZVOUS_PORT = 29400  # the namespaces are new: nothing else listens in them
# A survivor's bound: the collective timeout, one bounded store read (peers.PeerWatch:
# at least 5 s), the 30 s torchrun gets after its ranks (torchrun.TORCHRUN_AFTER_RANKS_S),
# and start-up slack for a loaded 2-core machine.
SURVIVOR_BOUND_S = COLLECTIVE_TIMEOUT_S + 5 + 30 + 25


def _overrides(data: Path, run: Path) -> list[str]:
    return overrides(data, run, **{"train.max_steps": STEPS,
                                   "train.checkpoint_every_steps": CHECKPOINT_EVERY,
                                   "train.collective_timeout_s": COLLECTIVE_TIMEOUT_S})  # fmt: skip


def _start(first: hosts.Host, second: hosts.Host, argv: list[str], logs: Path):
    """``megabatch launch`` on both hosts, one rank each; {host: process}."""
    procs = {}
    for host in (first, second):
        launch = [sys.executable, "-m", "megabatch.trainer.cli", "launch", "--nnodes=2",
                  "--nproc-per-node=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint={first.address}:{RENDEZVOUS_PORT}", "--rdzv-id=multinode",
                  # The store is the first host's torchrun's; the second must not try to
                  # host it (the hosts share one name, which resolves to neither address).
                  f"--rdzv-conf=is_host={int(host is first)}", f"--local-addr={host.address}",
                  "train", *argv]  # fmt: skip
        log = (logs / f"{host.namespace}.log").open("w")
        procs[host] = subprocess.Popen(host.command(launch), cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT,
                                       env=env(GLOO_SOCKET_IFNAME=hosts.INTERFACE))  # fmt: skip
    return procs


def _wait(procs: dict, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    return {host: proc.wait(timeout=max(1, deadline - time.monotonic()))
            for host, proc in procs.items()}  # fmt: skip


def _log(logs: Path, host: hosts.Host) -> str:
    return (logs / f"{host.namespace}.log").read_text(errors="replace")


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def _logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.exists() else 0


def _assert_final_weights_equal(run: Path, reference: Path) -> None:
    want = weights(reference / "checkpoints" / f"step{STEPS:08d}")
    got = weights(run / "checkpoints" / f"step{STEPS:08d}")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def one_host_run(data, tmp_path_factory) -> Path:
    """The same run on one host: 2 ranks under one torchrun."""
    run = tmp_path_factory.mktemp("one-host") / "run"
    done = train(_overrides(data, run), ranks=2, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture
def two_hosts():
    with hosts.TwoHosts() as pair:
        yield pair


@pytest.mark.timeout(300)
def test_a_run_across_two_hosts_trains_exactly_as_on_one(one_host_run, two_hosts, data,
                                                          tmp_path):  # fmt: skip
    first, second = two_hosts
    run = tmp_path / "run"
    sent_before = first.bytes_sent()
    statuses = _wait(_start(first, second, _overrides(data, run), tmp_path), 240)
    assert list(statuses.values()) == [0, 0], (
        _log(tmp_path, first)[-3000:] + _log(tmp_path, second)[-3000:]
    )

    # The batch spanned the hosts: every step's gradients (an all-reduce of the whole
    # model) and embeddings crossed the link, in both directions.
    model_bytes = sum(t.numel() * t.element_size() for t in
                      weights(one_host_run / "checkpoints" / f"step{STEPS:08d}").values())  # fmt: skip
    assert first.bytes_sent() - sent_before > STEPS * model_bytes / 2
    assert second.bytes_sent() > STEPS * model_bytes / 2
    assert _losses(run) == _losses(one_host_run)
    _assert_final_weights_equal(run, one_host_run)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("lost", ["first", "second"], ids=["store-host-lost", "other-host-lost"])
def test_a_lost_host_ends_the_other_in_bounded_time_and_a_rerun_resumes(
    lost, one_host_run, two_hosts, data, tmp_path
):
    first, second = two_hosts
    victim, survivor = (first, second) if lost == "first" else (second, first)
    run, argv = tmp_path / "run", _overrides(data, tmp_path / "run")
    (tmp_path / "lost").mkdir()
    procs = _start(first, second, argv, tmp_path / "lost")
    deadline = time.monotonic() + 120
    while _logged_steps(run) < CHECKPOINT_EVERY + 2 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs.values()), _log(tmp_path / "lost", first)
        time.sleep(0.1)
    victim.cut()
    victim.kill()
    lost_at, lost_after = time.monotonic(), _logged_steps(run)
    assert lost_after < STEPS, "the run ended before the host was lost"
    try:
        status = procs[survivor].wait(timeout=SURVIVOR_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the survivor still runs {SURVIVOR_BOUND_S} s after its peer's host was lost\n"
            + _log(tmp_path / "lost", survivor)[-3000:]
        ) from None
    took = time.monotonic() - lost_at
    procs[victim].wait(timeout=30)
    said = errors(_log(tmp_path / "lost", survivor))
    assert status == 1 and took < SURVIVOR_BOUND_S, (status, took, said)
    (line,) = [e for e in said if ": error: " in e]
    assert f"over train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}" in line
    if victim is first:
        assert f"the rendezvous store at {first.address}:" in line
        assert "does not answer either: its host (rank 0, or torchrun on the first node)" in line
    else:
        assert re.search(r"rank \d stopped answering \(last heartbeat \d+ s ago, from ", line), line

    victim.reconnect()  # the host is back; the same commands again
    (tmp_path / "rerun").mkdir()
    statuses = _wait(_start(first, second, argv, tmp_path / "rerun"), 240)
    rerun_logs = _log(tmp_path / "rerun", first) + _log(tmp_path / "rerun", second)
    assert list(statuses.values()) == [0, 0], rerun_logs[-4000:]
    (resumed,) = set(re.findall(r"resumed from \S+/step(\d+) at step", rerun_logs))
    assert CHECKPOINT_EVERY <= int(resumed) <= lost_after
    assert int(resumed) % CHECKPOINT_EVERY == 0
    _assert_final_weights_equal(run, one_host_run)
