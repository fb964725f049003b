"""Run a function on several CPU ranks (gloo) from a test, and collect what each returns.

    def _check(rank, world_size, n):            # module level: spawned ranks import it
        ...
        return tensor                            # picklable; tensors come back on CPU

    results = run_ranks(_check, 2, 8)           # [rank 0's result, rank 1's result]

Each rank is a fresh process (spawn) with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE,
LOCAL_RANK and DS_ACCELERATOR=cpu set and the default process group initialised, as
torchrun would leave it. A rank that raises or dies fails the call with RankError, naming
the rank and holding its traceback (when several fail, the earliest: the others usually
fail because of it); a hang past ``timeout_s`` kills every rank and raises TimeoutError.
"""

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised or died; the message names the rank and holds its traceback."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, list | tuple):
        items = [_to_cpu(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _rank_main(fn, rank, world_size, port, backend, timeout_s, args, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    failed_at, payload = None, b""
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        # Plain pickle (bytes), not torch's shared-memory tensor passing, so the result
        # stays valid after this process exits.
        payload = pickle.dumps(_to_cpu(fn(rank, world_size, *args)))
    except BaseException:
        # Time-stamped before the process group is torn down: the teardown breaks the
        # peers' collectives, and their failures must sort after this one.
        failed_at, payload = time.time(), traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put((rank, failed_at, payload))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout_s: float = 60,
    backend: str = "gloo",
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the
    results in rank order. ``fn`` must be a module-level function."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, backend, timeout_s, args, results),
            name=f"rank{rank}",
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    # Each rank reports (rank, None, pickled result) or (rank, time of failure, traceback).
    # One rank's exception usually breaks its peers' collectives too ("Connection reset by
    # peer"), so after the first failure wait a moment for the others and report the
    # earliest: that one is the cause.
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    failures: dict[int, tuple[float, str]] = {}  # rank -> (failed at, traceback or reason)
    dead_since: dict[int, float] = {}
    first_failure = None  # monotonic time of the first failure seen
    try:
        while len(values) + len(failures) < world_size:
            now = time.monotonic()
            if first_failure is not None and now > first_failure + 2.0:
                break
            if now > deadline:
                if failures:
                    break
                missing = sorted(set(range(world_size)) - values.keys())
                raise TimeoutError(
                    f"ranks {missing} did not finish within {timeout_s} s; all ranks killed"
                )
            try:
                rank, failed_at, payload = results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(procs):
                    # A rank that exited without reporting (segfault, os._exit, OOM kill).
                    # Its last message may still be in the pipe: allow it a second. A crash
                    # sorts before any reported exception (failed at 0.0).
                    if r not in values and r not in failures and p.exitcode is not None:
                        if now - dead_since.setdefault(r, now) > 1.0:
                            reason = f"exited with code {p.exitcode} without reporting a result"
                            failures[r] = (0.0, reason)
                            first_failure = first_failure or now
                continue
            if failed_at is None:
                values[rank] = pickle.loads(payload)
            else:
                failures[rank] = (failed_at, payload)
                first_failure = first_failure or time.monotonic()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
        results.close()

    if failures:
        first = min(failures, key=lambda r: failures[r][0])
        message = f"rank {first} of {world_size} failed:\n{failures[first][1]}"
        others = sorted(set(failures) - {first})
        if others:
            message += f"\n(ranks {others} failed after it, probably as a consequence)"
        raise RankError(message)
    return [values[rank] for rank in range(world_size)]
