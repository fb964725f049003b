"""Whole training runs as a user starts them, for the trainer's tests: the tiny shard
set's overrides, the command lines (one process, torchrun, or plain ranks as srun starts
them), and the environment (CPU ranks, one thread each)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
EXIT_REQUEUE = 75
# The session's finished run (conftest.py's zero2_run): ZeRO 2, whose optimizer partitions
# are a file of their own, 2 steps, a checkpoint at step 2.
ZERO2 = {"engine.zero_stage": 2, "train.max_steps": 2, "train.checkpoint_every_steps": 2}


def write_data(folder: Path) -> Path:
    """96 training samples (shards of 16), 32 held out, and a tokenizer: the tiny set."""
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
    from tests.data_pipeline.fake_shards import captions, write_shards

    write_shards(folder / "train", 96, per_shard=16)
    write_shards(folder / "val", 32, per_shard=16, start=1000)
    CaptionTokenizer.train(captions(96), vocab_size=300, context_length=8).save(folder / "tok.json")
    return folder


def overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    values = {
        "task": "clip", "run_dir": run_dir, "data.train": data / "train", "data.val": data / "val",
        "data.tokenizer": data / "tok.json", "data.num_workers": 0, "data.load_size": 16,
        "data.shuffle_block": 8, "model.image_size": 16, "model.context_length": 8,
        "batch.micro_batch_size": 8, "batch.accumulation_steps": 2, "optim.warmup_steps": 1,
        "train.max_steps": 6, "train.log_every": 1, "train.checkpoint_every_steps": 3,
        "train.checkpoint_every_minutes": "null", "train.eval_every": "null", **extra,
    }  # fmt: skip
    return [f"{k}={v}" for k, v in values.items()]


def command(overrides: list[str], ranks: int = 1, subcommand: str = "train") -> list[str]:
    """One process, or ``megabatch launch`` (torchrun) for several ranks."""
    if ranks == 1:
        return [sys.executable, "-m", "megabatch.trainer.cli", subcommand, *overrides]
    return [sys.executable, "-m", "megabatch.trainer.cli", "launch", f"--nproc-per-node={ranks}",
            subcommand, *overrides]  # fmt: skip


def env(**extra) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), **extra}  # fmt: skip


def train(overrides, ranks=1, timeout=100, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(command(overrides, ranks), cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def evaluate(run_dir: Path, *more, timeout=100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "eval", str(run_dir), *more],
                          cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def consume(script: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """A downstream team's script (export_consumer.py and the like, which block megabatch
    themselves: blocked_imports.py), run without this checkout on the path; exit 0."""
    clean = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(checkpoint: Path) -> dict:
    """The model's weights as saved (our own test files: a full load is fine here)."""
    state = torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def errors(stderr: str) -> list[str]:
    """The lines of stderr that are megabatch's own (not torch's or DeepSpeed's logging)."""
    return [line for line in stderr.splitlines() if line.startswith("megabatch")]
