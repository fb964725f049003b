"""Signals and starts that must not hang: SIGTERM to a rank and its DataLoader workers
saves and exits 75; SIGTERM while a rank waits for data that never comes still exits 75;
a stale lock in the torch extensions cache does not block a start."""

import os
import signal
import subprocess
import time

import psutil

from tests.trainer.runs import EXIT_REQUEUE, ROOT, command, env, errors, overrides, train


def _wait_for(predicate, proc, timeout_s=90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out (process exited with {proc.poll()})")


def _start(argv, **extra_env) -> subprocess.Popen:
    # A session of its own, so that the test can end everything it started at once.
    return subprocess.Popen(argv, cwd=ROOT, env=env(**extra_env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _end(proc: subprocess.Popen) -> str:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.communicate()[1]


def test_sigterm_to_the_rank_and_its_workers_saves_and_exits_for_requeue(data, tmp_path):
    run = tmp_path / "run"
    extra = {"data.num_workers": 2, "train.max_steps": 100000,
             "train.checkpoint_every_steps": "null"}  # fmt: skip
    proc = _start(command(overrides(data, run, **extra)))
    try:
        metrics = run / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 2, proc)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 3  # the rank and its two workers
        for process in tree:  # what scancel and torchrun's shutdown do
            process.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        err = _end(proc)
    assert status == EXIT_REQUEUE, err[-3000:]
    saved = [p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").is_file()]
    assert len(saved) == 1 and int(saved[0].name[4:]) >= 2


def test_sigterm_while_waiting_for_data_that_never_comes_exits_for_requeue(data, tmp_path):
    # A user-written pipe: source whose command never produces a byte.
    shard = data / "train" / "00000.tar"
    extra = {"data.train": f"'pipe:sleep 600; cat {shard}'", "train.max_steps": 10}
    proc = _start(command(overrides(data, tmp_path / "run", **extra)))
    try:
        rank = psutil.Process(proc.pid)
        _wait_for(lambda: any("sleep" in c.name() for c in rank.children(recursive=True)), proc)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        err = _end(proc)
    assert status == EXIT_REQUEUE, err[-3000:]
    assert any("SIGTERM while waiting for data" in line for line in errors(err) + [err])
    assert "exiting for requeue without a save (there is no checkpoint yet)" in err


def test_a_stale_extension_build_lock_does_not_block_a_start(data, tmp_path):
    """A start killed while DeepSpeed JIT-built its CPU op left this lock behind; every
    later start on the machine used to wait on it for ever."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    extra = {"train.max_steps": 1, "train.checkpoint_every_steps": "null"}
    proc = train(overrides(data, tmp_path / "run", **extra), timeout=100,
                 TORCH_EXTENSIONS_DIR=str(extensions))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sigterm_raises_unwinds_a_one_shot_command_and_puts_the_handler_back():
    """export and embed: SIGTERM raises SystemExit(143) in the block, so that their
    partial output is removed on the way out; after it, the previous handler is back."""
    import pytest

    from megabatch.trainer.stop_signals import sigterm_raises

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_, sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
    assert exit_.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
