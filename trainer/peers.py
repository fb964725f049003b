"""Who is still there: every rank's heartbeat in the rendezvous store, so that a rank
left waiting in a collective can say which peer stopped answering instead of hanging.

Each rank runs a ``PeerWatch`` thread. Every ``interval_s`` it writes its heartbeat,
``megabatch/attemptA/heartbeat/R`` = {wall time, step, phase, since when, exit status}, to the
TCP store the process group was built on (rank 0's, or torchrun's agent's), and it
watches its own main thread: when the main thread has been in one phase longer than the
collective timeout (``train.collective_timeout_s``), the thread reads every heartbeat.

- A peer whose heartbeat is older than ``3 x interval_s`` (SIGSTOPped, hung in the
  kernel, dead without a word), or that recorded its exit, stopped answering: this rank
  prints one line naming it and exits (``os._exit``: the main thread is stuck in C++).
- All peers alive: they are slow, not gone (rank 0 evaluating, a peer waiting for its
  data); one warning line per timeout says who this rank waits for, and it waits on.
- The store itself does not answer: its host (rank 0, or torchrun on the first node)
  stopped answering.

A rank that leaves early (a data error, a requeue without a save) records its exit
status and sets one shared key; every watch checks that key at each beat, and a rank
whose main thread has not moved for two beats then leaves too, with the same line (on
NCCL a collective with a departed peer would otherwise wait out the timeout).

Every store call is bounded (``BoundedStore``): a store whose host stopped without
closing its connections (cut off the network, powered off, SIGSTOPped) never answers,
and TCPStore's own timeout does not end such a call, so the watch would wait with its
rank.

The process group's own timeout is set longer than ``collective_timeout_s`` (see
``megabatch.trainer.launch``), so this watch speaks first; when a collective fails before that (a
peer's connection closed), ``describe_failure`` reads the heartbeats the same way.
A SIGSTOPped process stops all its threads, its heartbeat included: that is what makes
it visible. Heartbeats compare wall clocks across nodes, which NTP keeps seconds apart,
well under the staleness bound.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

# Keys are per torchrun attempt (its restarts keep the store): nothing of a previous
# attempt's is read as this one's.
_PREFIX = f"megabatch/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
KEY = _PREFIX + "heartbeat/{rank}"
DONE_KEY = _PREFIX + "done/{name}"
# Set by a rank that leaves early (an error, a requeue): one key every watch checks at
# each beat, so peers stuck in a collective with it learn within a beat, not a timeout.
LEFT_KEY = _PREFIX + "a-rank-left"
# Phases in which the main thread waits on something other than a collective: its own
# data, or (``wait_for``) a named peer it keeps checking on.
OWN_WAITS = ("data", "eval-wait")
_HOST = socket.gethostname()


class PeerLostError(RuntimeError):
    """A peer stopped answering or exited; ``verdict`` says who."""

    def __init__(self, verdict: Verdict):
        super().__init__(verdict.message)
        self.verdict = verdict


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    time: float
    step: int
    phase: str
    since: float
    exit_status: int | None = None
    reason: str = ""
    host: str = ""  # the machine's name (a pod's, on Kubernetes): which one to look at

    def describe(self, now: float) -> str:
        if self.exit_status is not None:
            why = f": {self.reason}" if self.reason else ""
            return f"rank {self.rank} exited with status {self.exit_status}{why}"
        return (f"rank {self.rank} at step {self.step + 1} ({self.phase}, for "
                f"{now - self.since:.0f} s)")  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """What the heartbeats say: the peers ``gone`` (stale or exited), and whether the
    store answered at all."""

    message: str
    gone: tuple[Heartbeat, ...] = ()
    store_answered: bool = True

    @property
    def requeue(self) -> bool:
        """A peer left for a requeue (exit 75): this rank should too."""
        return bool(self.gone) and all(h.exit_status == 75 for h in self.gone)


class StoreSilentError(RuntimeError):
    """A store call did not return within its deadline."""


class BoundedStore:
    """A TCPStore client whose calls return within ``deadline_s`` or raise
    StoreSilentError. The calls run one at a time on a thread of its own (so the watch
    and the main thread may share it); while a call that overran is still stuck there,
    every later one fails at once: the store has not answered yet."""

    def __init__(self, client, deadline_s: float):
        self._client, self.deadline_s = client, deadline_s
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._busy_since: float | None = None
        threading.Thread(target=self._serve, name="megabatch-peer-store", daemon=True).start()

    def set(self, key: str, value: str) -> None:
        self._call("set", self._client.set, (key, value))

    def check(self, keys: list[str]) -> bool:
        return self._call("check", self._client.check, (keys,))

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._call("multi_get", self._client.multi_get, (keys,))

    def _call(self, name: str, method, args):
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.deadline_s:
            raise StoreSilentError(f"store {name}: an earlier call has not returned for "
                                   f"{time.monotonic() - busy_since:.0f} s")  # fmt: skip
        outcome: list = []
        done = threading.Event()
        self._calls.put((method, args, outcome, done))
        if not done.wait(self.deadline_s):
            raise StoreSilentError(f"store {name}: no answer in {self.deadline_s:g} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _serve(self) -> None:
        while True:
            method, args, outcome, done = self._calls.get()
            self._busy_since = time.monotonic()
            try:
                outcome.append((True, method(*args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome.append((False, exc))
            self._busy_since = None
            done.set()


class PeerWatch:
    def __init__(self, rank: int, world_size: int, timeout_s: float, host: str, port: int,
                 on_stall=None):  # fmt: skip
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.host, self.port = host, port
        # Beats often enough that a stopped peer looks stale well within the timeout.
        self.interval_s = max(0.5, min(10.0, timeout_s / 4))
        self.stale_s = 3 * self.interval_s
        # How long one store call may take before the store counts as not answering.
        self.call_deadline_s = max(5.0, 2 * self.interval_s)
        self.on_stall = on_stall or _exit_on_stall
        self._step, self._phase, self._since = 0, "starting", time.time()
        self._exit: tuple[int, str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megabatch-peer-watch",
                                        daemon=True)  # fmt: skip
        self._store: BoundedStore | None = None  # shared by the watch and the main thread

    # ------------------------------------------------------------------ main thread
    def start(self) -> None:
        client = dist.TCPStore(self.host, self.port, is_master=False,
                               timeout=timedelta(seconds=max(self.timeout_s, 30.0)))  # fmt: skip
        self._store = BoundedStore(client, self.call_deadline_s)
        self._publish()
        self._thread.start()

    def announce(self, name: str) -> None:
        """Tell the peers that this rank is done with ``name`` (see ``wait_for``)."""
        self._store.set(DONE_KEY.format(name=name), str(self.rank))

    def wait_for(self, rank: int, name: str) -> None:
        """Wait until ``rank`` announces ``name``, for as long as that rank is alive: the
        wait for work of unknown length on one rank (rank 0's evaluation), which a
        collective's fixed timeout would cut short. Raises PeerLostError if it is gone."""
        key = DONE_KEY.format(name=name)
        while not self._announced(key):
            time.sleep(min(1.0, self.interval_s / 2))
            # Only that rank's heartbeat: every waiting rank reads it each second.
            verdict = self.verdict(f"rank {self.rank} waits for rank {rank} to finish {name}",
                                   ranks=[rank])  # fmt: skip
            if not verdict.store_answered or any(h.rank == rank for h in verdict.gone):
                raise PeerLostError(verdict)

    def _announced(self, key: str) -> bool:
        try:
            return self._store.check([key])  # check() never blocks (no timeout noise)
        except Exception:  # noqa: BLE001 - a store that does not answer is the answer
            raise PeerLostError(self._store_silent(f"rank {self.rank} waits")) from None

    def phase(self, step: int, name: str) -> None:
        """The main thread enters ``name`` in (0-based) ``step``: two attribute writes."""
        self._step, self._phase, self._since = step, name, time.time()

    def exited(self, status: int, reason: str = "") -> None:
        """Record this rank's exit so that peers can tell 'left' from 'hung'; a non-zero
        status also tells every watch to look (LEFT_KEY)."""
        self._exit = (status, reason[:300])
        self._stop.set()
        try:
            self._publish()
            if status != 0:
                self._store.set(LEFT_KEY, str(self.rank))
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass

    def stop(self) -> None:
        self._stop.set()

    def describe_failure(self, what: str) -> Verdict:
        """After a collective failed: whom the heartbeats blame, waiting up to one
        staleness bound for a peer that just died to look stale."""
        deadline = time.time() + self.stale_s + self.interval_s
        while True:
            verdict = self.verdict(what)
            if verdict.gone or not verdict.store_answered or time.time() > deadline:
                return verdict
            time.sleep(self.interval_s / 2)

    def verdict(self, what: str, ranks: list[int] | None = None) -> Verdict:
        """What the heartbeats of ``ranks`` (default: every other rank) say."""
        now = time.time()
        ranks = [r for r in range(self.world_size) if r != self.rank] if ranks is None else ranks
        try:
            beats = self._read(ranks)
        except Exception:  # noqa: BLE001 - a store that does not answer is the answer
            return self._store_silent(what)
        gone = tuple(
            h for h in beats.values()
            if h.rank != self.rank and (h.exit_status is not None or now - h.time > self.stale_s)
        )  # fmt: skip
        missing = [r for r in ranks if r not in beats]
        parts = [
            h.describe(now) if h.exit_status is not None
            else f"rank {h.rank} stopped answering (last heartbeat {now - h.time:.0f} s ago, "
                 f"from {h.host or 'an unnamed host'}, at step {h.step + 1}, {h.phase})"
            for h in gone
        ]  # fmt: skip
        parts += [f"rank {r} never sent a heartbeat" for r in missing]
        if parts:
            return Verdict(f"{what}: " + "; ".join(parts), gone)
        others = "; ".join(h.describe(now) for h in beats.values() if h.rank != self.rank)
        return Verdict(f"{what}; every rank is alive: {others}")

    def _store_silent(self, what: str) -> Verdict:
        return Verdict(f"{what}; the rendezvous store at {self.host}:{self.port} does not "
                       "answer either: its host (rank 0, or torchrun on the first node) "
                       "stopped answering", store_answered=False)  # fmt: skip

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        warned_at = 0.0
        while not self._stop.wait(self.interval_s):
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - a host that stopped is seen below
                pass
            waited = time.time() - self._since
            if self._phase in OWN_WAITS:
                continue
            timed_out = waited >= self.timeout_s
            if not timed_out and not (waited >= 2 * self.interval_s and self._a_rank_left()):
                continue
            what = (f"rank {self.rank} has waited {waited:.0f} s at step {self._step + 1} "
                    f"({self._phase})")  # fmt: skip
            if timed_out:
                what += f", over train.collective_timeout_s={self.timeout_s:g}"
            verdict = self.verdict(what)
            if verdict.gone or not verdict.store_answered:
                self.on_stall(self, verdict)
                return
            if timed_out and time.time() - warned_at >= self.timeout_s:  # slow: say so, wait on
                print(f"megabatch: warning: {verdict.message}", file=sys.stderr, flush=True)
                warned_at = time.time()

    def _a_rank_left(self) -> bool:
        try:
            return self._store.check([LEFT_KEY])
        except Exception:  # noqa: BLE001 - an unreachable store is seen at the timeout
            return False

    def _publish(self) -> None:
        status, reason = self._exit if self._exit else (None, "")
        beat = {"time": time.time(), "step": self._step, "phase": self._phase,
                "since": self._since, "exit_status": status, "reason": reason,
                "host": _HOST}  # fmt: skip
        self._store.set(KEY.format(rank=self.rank), json.dumps(beat))

    def _read(self, ranks: list[int]) -> dict[int, Heartbeat]:
        store = self._store
        present = [r for r in ranks if store.check([KEY.format(rank=r)])]  # get() would block
        values = store.multi_get([KEY.format(rank=r) for r in present]) if present else []
        beats = {}
        for r, raw in zip(present, values, strict=True):
            data = json.loads(raw)
            beats[r] = Heartbeat(r, data["time"], data["step"], data["phase"], data["since"],
                                 data.get("exit_status"), data.get("reason", ""),
                                 data.get("host", ""))  # fmt: skip
        return beats


def is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed's own errors, and the backends' plain RuntimeErrors (gloo:
    "Connection closed by peer", "Timed out waiting ... for recv"; NCCL's watchdog)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or "gloo" in text or "NCCL" in text


def _exit_on_stall(watch: PeerWatch, verdict: Verdict) -> None:
    """The default reaction: one line, the heartbeat says why, and out (75 when the peer
    left for a requeue, else 1). The main thread is blocked in a collective, so this is
    the only thread that can end the process."""
    status = 75 if verdict.requeue else 1
    print(f"megabatch: rank {watch.rank}: error: {verdict.message}", file=sys.stderr, flush=True)
    watch.exited(status, "a peer stopped answering")
    from megabatch.trainer.torchrun import (
        record_exit_status,  # for `megabatch launch`, if it runs us
    )

    record_exit_status(status)
    os._exit(status)
