"""Self-tests of the multi-process helper in tests/multiproc.py."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import RankError, run_ranks

pytestmark = pytest.mark.multiproc


def _sum_of_ranks(rank: int, world_size: int, scale: float) -> dict:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)  # proves the process group is up and spans all ranks
    return {"rank": rank, "world_size": world_size, "sum": t * scale}


def _rank1_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from the second rank")
    dist.barrier()  # rank 0 waits for rank 1 forever: it must be killed, not awaited


def _rank1_crashes(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)  # dies without reporting, like a segfault or an OOM kill
    dist.barrier()


def _rank0_hangs(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(3600)


def test_results_come_back_in_rank_order():
    results = run_ranks(_sum_of_ranks, 2, 10.0)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 for r in results)
    for r in results:
        torch.testing.assert_close(r["sum"], torch.tensor([10.0]))


def test_failing_rank_is_named_with_its_traceback():
    with pytest.raises(RankError, match="rank 1 of 2 failed") as info:
        run_ranks(_rank1_raises, 2, timeout_s=30)
    assert "ValueError: boom from the second rank" in str(info.value)
    assert "_rank1_raises" in str(info.value)  # the child's traceback, not just the message


def test_crashed_rank_is_named_with_its_exit_code():
    with pytest.raises(RankError, match="rank 1 of 2 failed:\nexited with code 3"):
        run_ranks(_rank1_crashes, 2, timeout_s=30)


def test_hanging_rank_is_killed_with_timeout_error():
    start = time.monotonic()
    # Rank 1 must have started and finished within the limit: spawning and importing torch
    # took over 5 s on a loaded 2-core CI machine, so the limit is 20 s.
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish within 20 s"):
        run_ranks(_rank0_hangs, 2, timeout_s=20)
    assert time.monotonic() - start < 35
