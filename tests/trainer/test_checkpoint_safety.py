"""No file of a run directory runs code when a run resumes or is evaluated: a malicious
pickle planted in each file either reads is refused with one line naming the file."""

import os
import shutil

import torch

from tests.multiproc import run_ranks
from tests.trainer.runs import ZERO2, errors, evaluate, overrides, train

STATE_FILES = {
    "model": "state/mp_rank_00_model_states.pt",
    "optimizer": "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "rank": "rank0.pt",
}


class _RunsACommand:
    """Unpickling this calls os.system: what a planted checkpoint file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _planted_copy(run, folder, *which: str):
    """A copy of ``run`` with a command-running pickle in place of each file named."""
    copy, marker = folder / "run", folder / "code-ran"
    shutil.copytree(run, copy)
    targets = []
    for name in which:
        target = copy / "checkpoints" / "step00000002" / STATE_FILES[name]
        assert target.is_file()
        torch.save({"module": _RunsACommand(f"touch {marker}")}, target)
        targets.append(target)
    return copy, targets, marker


def _load_each(rank, world_size, data, runs):
    """Resume's loading path (trainer.checkpoint.load) on each planted copy, one process."""
    from megabatch.trainer.checkpoint import CheckpointError, load, read_checkpoint
    from megabatch.trainer.config import load_config
    from megabatch.trainer.launch import World
    from megabatch.trainer.train import Trainer

    config = load_config(None, overrides(data, runs[0], **ZERO2))
    trainer = Trainer(config, World(0, 1, 0, torch.device("cpu")))
    messages = []
    for run in runs:
        try:
            load(trainer.engine, read_checkpoint(run / "checkpoints" / "step00000002"), 0)
        except CheckpointError as exc:
            messages.append(str(exc))
        else:
            messages.append(None)
    return messages


def test_resume_refuses_a_pickle_planted_in_any_file_it_reads(data, zero2_run, tmp_path):
    copies = {name: _planted_copy(zero2_run, tmp_path / name, name) for name in STATE_FILES}
    (messages,) = run_ranks(_load_each, 1, data, [c[0] for c in copies.values()], timeout_s=100)
    for (name, (_, (target,), marker)), message in zip(copies.items(), messages, strict=True):
        assert not marker.exists(), f"the pickle planted in the {name} file ran its command"
        assert message is not None and f"refusing to load {target}" in message, message
        assert "posix.system" in message

    # As a user meets it: one line, exit 2, and training does not go on.
    run, (target,), marker = copies["model"]
    proc = train(overrides(data, run, **{**ZERO2, "train.max_steps": 3}))
    assert not marker.exists()
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert f"refusing to load {target}" in line
    assert not (run / "checkpoints" / "step00000003").exists()


def test_eval_refuses_a_planted_model_file_and_reads_no_other(zero2_run, tmp_path):
    run, (target,), marker = _planted_copy(zero2_run, tmp_path / "model", "model")
    proc = evaluate(run)
    assert not marker.exists(), "the planted pickle ran its command"
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert f"refusing to load {target}" in line

    # Evaluation needs the weights only: planted optimizer and rank files are never read.
    run, _, marker = _planted_copy(zero2_run, tmp_path / "others", "optimizer", "rank")
    proc = evaluate(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
