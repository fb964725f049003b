"""Whole training runs as a user starts them (``python -m trainer.cli train``), on tiny
shards: 2-rank DeepSpeed with ZeRO 1 and 2, a SIGKILL-ed run resumed to the same
parameters as an uninterrupted one, SIGTERM -> save -> exit 75, half-written
checkpoints ignored, and bad configs refused before any process group starts."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.tokenizer import CaptionTokenizer
from tests.data_pipeline.fake_shards import captions, write_shards

ROOT = Path(__file__).resolve().parents[2]
EXIT_REQUEUE = 75


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_shards(folder / "train", 96, per_shard=16)
    write_shards(folder / "val", 32, per_shard=16, start=1000)
    CaptionTokenizer.train(captions(96), vocab_size=300, context_length=8).save(folder / "tok.json")
    return folder


def _overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "task": "clip", "run_dir": run_dir, "data.train": data / "train", "data.val": data / "val",
        "data.tokenizer": data / "tok.json", "data.num_workers": 0, "data.load_size": 16,
        "data.shuffle_block": 8, "model.image_size": 16, "model.context_length": 8,
        "batch.micro_batch_size": 8, "batch.accumulation_steps": 2, "optim.warmup_steps": 1,
        "train.max_steps": 6, "train.log_every": 1, "train.checkpoint_every_steps": 3,
        "train.checkpoint_every_minutes": "null", "train.eval_every": "null", **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def _command(overrides: list[str], ranks: int = 1) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "trainer.cli", "train", *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}", "-m", "trainer.cli", "train", *overrides]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train(overrides, ranks=1, timeout=100):
    return subprocess.run(_command(overrides, ranks), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _weights(checkpoint: Path) -> dict:
    state = torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


@pytest.mark.multiproc
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_train_checkpoint_and_evaluate(data, tmp_path, zero_stage):
    run = tmp_path / "run"
    proc = _train(_overrides(data, run, **{"engine.zero_stage": zero_stage}), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [
        line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert len(records) == 6
    assert (run / "checkpoints" / "step00000003" / "COMPLETE").is_file()
    assert (run / "checkpoints" / "step00000006" / "COMPLETE").is_file()
    assert "retrieval_i2t_r1" in (run / "results.json").read_text()
    assert "# global_batch_size: 32" in (run / "config.yaml").read_text()  # 8 x 2 x 2 ranks
    assert {p.name for p in (run / "plots").iterdir()} >= {"loss.png", "throughput.png"}


def test_sigkill_then_resume_ends_with_identical_parameters(data, tmp_path):
    steps = ["train.max_steps=12"]
    whole = tmp_path / "whole"
    assert _train(_overrides(data, whole) + steps).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen(_command(_overrides(data, run) + steps), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = run / "checkpoints" / "step00000003" / "COMPLETE"
    deadline = time.monotonic() + 90
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "step00000012").exists(), "the run ended before the kill"

    resumed = _train(_overrides(data, run) + steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want = _weights(whole / "checkpoints" / "step00000012")
    got = _weights(run / "checkpoints" / "step00000012")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_sigterm_saves_then_exits_for_requeue(data, tmp_path):
    run = tmp_path / "run"
    overrides = _overrides(
        data, run, **{"train.max_steps": 100000, "train.checkpoint_every_steps": "null"}
    )
    proc = subprocess.Popen(_command(overrides), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_REQUEUE
    saved = [p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").is_file()]
    assert len(saved) == 1 and int(saved[0].name[4:]) >= 2


def test_half_written_checkpoints_are_ignored(data, tmp_path):
    run = tmp_path / "run"
    assert _train(_overrides(data, run)).returncode == 0
    checkpoints = run / "checkpoints"
    (checkpoints / "step00000009").mkdir()  # killed before its COMPLETE marker
    (checkpoints / "step00000009" / "meta.json").write_text("{garbage")
    (checkpoints / ".tmp-step00000012").mkdir()  # killed while writing
    proc = _train(_overrides(data, run, **{"train.max_steps": 8}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step00000006" in proc.stderr.split("resumed from")[1].splitlines()[0]
    assert (checkpoints / "step00000008" / "COMPLETE").is_file()
    assert not (checkpoints / ".tmp-step00000012").exists()  # cleaned by the next save


@pytest.mark.parametrize(
    "override,message",
    [
        ("batch.micro_batch_size=0", "batch.micro_batch_size must be >= 1"),
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("engine.zero_stage=five", "engine.zero_stage: expected an integer"),
        ("batch.global_batch_size=100", "batch.global_batch_size is 100"),
    ],
)
def test_bad_config_is_one_line_before_any_process_group(data, tmp_path, override, message):
    start = time.monotonic()
    proc = _train(_overrides(data, tmp_path / "run") + [override])
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - start < 30


def test_eval_command_reloads_the_newest_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    assert _train(_overrides(data, run)).returncode == 0
    (run / "results.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "eval", str(run)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step00000006" in proc.stderr
    assert '"retrieval_i2t_r1"' in proc.stdout
    assert (run / "results.json").is_file()
