"""Checkpoints that do not lie: none written during a non-finite streak, stray names
ignored, only the newest K kept, a full disk said as such with the previous checkpoint
intact, and resume refusing config changes that alter what a step means."""

import json
import math
import shlex
import shutil
import subprocess
import sys

import pytest

from megabatch.trainer.config import load_config
from megabatch.trainer.resume import plan_resume
from tests.trainer.runs import ROOT, command, env, errors, overrides, train


def _checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))


def _learning_rates(run) -> dict[int, float]:
    """Per logged step, the learning rate of the next step."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["lr"] for r in map(json.loads, lines) if "lr" in r}


def test_no_checkpoint_during_a_nonfinite_streak_and_resume_starts_before_it(data, tmp_path):
    # lr 1e30: step 1's loss is finite, its update sends the weights to ~1e30, and every
    # later loss is NaN.
    run = tmp_path / "run"
    extra = {"optim.lr": 1e30, "optim.warmup_steps": 0, "train.checkpoint_every_steps": 1,
             "train.keep_checkpoints": "null", "train.max_nonfinite_steps": 3,
             "train.max_steps": 20}  # fmt: skip
    proc = train(overrides(data, run, **extra))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _checkpoints(run) == ["step00000001"]
    (line,) = errors(proc.stderr)
    assert "3 non-finite losses in a row (steps 2-4)" in line
    assert f"the newest checkpoint is step 1 ({run / 'checkpoints' / 'step00000001'})" in line
    meta = json.loads((run / "checkpoints" / "step00000001" / "meta.json").read_text())
    assert meta["step"] == 1 and meta["loss"] > 0
    # What a restart resumes from (train.resume=auto): the checkpoint the line named.
    plan = plan_resume(load_config(None, overrides(data, run, **extra)), world_size=1)
    assert plan.checkpoint.path == run / "checkpoints" / "step00000001"


def test_stray_names_are_ignored_and_only_the_newest_are_kept(data, tmp_path):
    run = tmp_path / "run"
    extra = {"train.checkpoint_every_steps": 1, "train.keep_checkpoints": 2}
    assert train(overrides(data, run, **extra, **{"train.max_steps": 2})).returncode == 0
    checkpoints = run / "checkpoints"
    assert _checkpoints(run) == ["step00000001", "step00000002"]
    shutil.copytree(checkpoints / "step00000002", checkpoints / "step00000002.bak")
    (checkpoints / "step_old").mkdir()
    (checkpoints / "step00000009").mkdir()  # no marker: not a checkpoint, not ours to remove

    proc = train(overrides(data, run, **extra, **{"train.max_steps": 5}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step00000002'} at step 2" in proc.stderr
    assert _checkpoints(run) == [
        "step00000002.bak", "step00000004", "step00000005", "step00000009", "step_old",
    ]  # fmt: skip


def test_a_full_disk_is_said_and_the_previous_checkpoint_stays_whole(data, tmp_path):
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace for a small tmpfs here: {probe.stderr.decode()[:200]}")
    run = tmp_path / "run"
    run.mkdir()
    first = overrides(data, run, **{"train.checkpoint_every_steps": 1, "train.max_steps": 3,
                                    "train.keep_checkpoints": 1})  # fmt: skip
    previous = run / "checkpoints" / "step00000001"
    # Every file of the previous checkpoint still loads (weights-only, as resume does).
    load_all = ("from pathlib import Path; from megabatch.trainer.checkpoint import load_weights_only; "
                f"[load_weights_only(p) for p in sorted(Path('{previous}').rglob('*.pt'))]; "
                "print('loaded')")  # fmt: skip
    report = tmp_path / "report"
    # A 16 MiB filesystem holds one checkpoint of the tiny model (about 11 MiB), not two:
    # the second save fills it. The mount lives as long as the shell: check inside it.
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {run} || exit 99\n"
        f"{_shell(command(first))} 2> {report}.err; echo $? > {report}.rc\n"
        f"ls -a {run / 'checkpoints'} > {report}.ls\n"
        f"test -f {previous / 'COMPLETE'} && echo complete > {report}.load\n"
        f"{_shell([sys.executable, '-c', load_all])} >> {report}.load 2>&1\n"
    )
    subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], cwd=ROOT,
                   env=env(), timeout=150, check=True)  # fmt: skip
    err = (tmp_path / "report.err").read_text()
    assert (tmp_path / "report.rc").read_text().strip() == "1", err[-3000:]
    (line,) = errors(err)
    assert f"checkpoint step 2 not saved: the disk holding {run / 'checkpoints'} is full" in line
    assert f"the previous checkpoint {run / 'checkpoints' / 'step00000001'} is intact" in line
    assert (tmp_path / "report.ls").read_text().split() == [".", "..", "step00000001"]
    assert (tmp_path / "report.load").read_text().split() == ["complete", "loaded"]


def _shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def test_resume_refuses_step_changes_applies_the_safe_ones_and_keeps_every_config(data, tmp_path):
    run = tmp_path / "run"
    base = {"train.checkpoint_every_steps": 2, "train.max_steps": 2, "optim.warmup_steps": 0}
    assert train(overrides(data, run, **base)).returncode == 0

    refused = train(overrides(data, run, **base, **{"batch.micro_batch_size": 4,
                                                    "model.embed_dim": 64}))  # fmt: skip
    assert refused.returncode == 2
    (line,) = errors(refused.stderr)
    assert "model.embed_dim None -> 64" in line and "batch.micro_batch_size 8 -> 4" in line
    assert len(sorted((run / "configs").iterdir())) == 1  # nothing started

    more = {**base, "train.max_steps": 4, "optim.lr": 1e-3, "optim.min_lr_ratio": 0.5}
    proc = train(overrides(data, run, **more))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: changed from the checkpoint's config: optim.lr 0.0005 -> 0.001" in proc.stderr
    # The schedule is the new config's: cosine from 1e-3 at step 0 to 0.5e-3 at step 4.
    after_step_3 = 1e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert _learning_rates(run)[3] == pytest.approx(after_step_3)
    history = sorted(p.name for p in (run / "configs").iterdir())
    assert history == ["000.yaml", "001.yaml"]
    first, second = ((run / "configs" / name).read_text() for name in history)
    assert "lr: 0.0005" in first and "resumed_from: none" in first
    assert "lr: 0.001" in second and "changed_on_resume: optim.lr 0.0005 -> 0.001" in second
    assert (run / "config.yaml").read_text() == second


# ------------------------------------------------------- the checkpoint folder, by itself
def _fake_checkpoint(root, step, meta='{"step": 0}', complete=True):
    """A checkpoint folder as ``checkpoint.save`` leaves it, without the DeepSpeed files
    (the functions below read only the name, the marker and meta.json)."""
    from megabatch.trainer.checkpoint import COMPLETE, META, checkpoint_name

    path = root / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / META).write_text(meta)
    if complete:
        (path / COMPLETE).touch()
    return path


def test_only_complete_well_named_checkpoints_count_oldest_first(tmp_path):
    from megabatch.trainer.checkpoint import complete_checkpoints

    for step in (30, 10, 20):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 40, complete=False)  # cut short: no marker
    _fake_checkpoint(tmp_path, 50, meta="{not json")
    _fake_checkpoint(tmp_path, 60, meta="[1, 2]")  # not a mapping
    (tmp_path / "step00000070.old-1").mkdir()  # a rename left behind by a crash
    (tmp_path / "best").mkdir()
    assert [c.step for c in complete_checkpoints(tmp_path)] == [10, 20, 30]
    assert complete_checkpoints(tmp_path / "missing") == []


def test_a_checkpoint_named_by_the_user_is_checked_with_one_line_errors(tmp_path):
    from megabatch.trainer.checkpoint import CheckpointError, read_checkpoint

    good = _fake_checkpoint(tmp_path, 5, meta='{"step": 5, "loss": 1.5}')
    assert read_checkpoint(good).step == 5 and read_checkpoint(good).loss_is_finite
    cases = {
        tmp_path / "nothing": "no checkpoint directory at",
        _fake_checkpoint(tmp_path, 6, complete=False): "is not a complete checkpoint",
        _fake_checkpoint(tmp_path, 7, meta="{"): "cannot read",
        _fake_checkpoint(tmp_path, 8, meta='"text"'): "does not hold a mapping",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as caught:
            read_checkpoint(path)
        assert "\n" not in str(caught.value)


def test_a_non_finite_loss_is_seen_in_the_meta(tmp_path):
    from megabatch.trainer.checkpoint import read_checkpoint

    assert not read_checkpoint(_fake_checkpoint(tmp_path, 1, '{"loss": NaN}')).loss_is_finite
    assert read_checkpoint(_fake_checkpoint(tmp_path, 2, "{}")).loss_is_finite  # older runs


def test_prune_keeps_the_newest_and_ignores_the_rest(tmp_path):
    from megabatch.trainer.checkpoint import complete_checkpoints, prune

    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    unfinished = _fake_checkpoint(tmp_path, 9, complete=False)
    removed = prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step00000001", "step00000002"]
    assert [c.step for c in complete_checkpoints(tmp_path)] == [3, 4]
    assert unfinished.is_dir()  # not a checkpoint: not the pruner's to remove


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    import random

    import numpy as np
    import torch

    from megabatch.trainer.checkpoint import load_weights_only, rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_weights_only(tmp_path / "rng.pt"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_without_zero_give_their_float32_masters(data, tmp_path, precision):
    """Without ZeRO, DeepSpeed keeps the float32 masters whole but nameless (the optimizer's
    fp32_groups, in engine.param_groups' order); model_weights names them back and checks
    each one rounds to the module's weight. A master put in the wrong place is refused."""
    import torch

    from megabatch.trainer.checkpoint import (
        MODEL_STATES,
        CheckpointError,
        model_weights,
        read_checkpoint,
    )

    run = tmp_path / "run"
    extra = {"engine.zero_stage": 0, "engine.precision": precision, "train.max_steps": 2,
             "train.checkpoint_every_steps": 2}  # fmt: skip
    proc = train(overrides(data, run, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = read_checkpoint(run / "checkpoints" / "step00000002")
    states = torch.load(checkpoint.path / "state" / MODEL_STATES, weights_only=True)
    module = states["module"]
    assert not list((checkpoint.path / "state").glob("*zero_pp_rank_*"))  # no partitions
    exported = model_weights(checkpoint)
    assert set(exported) == set(module)
    trained = [n for n in module if n not in states["buffer_names"]]
    finer = 0
    for name in trained:
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name].to(module[name].dtype), module[name]), name
        finer += not torch.equal(exported[name], module[name].float())
    assert finer > len(trained) // 2  # the masters, not the rounded weights widened
    decay = [n for n in trained if module[n].ndim >= 2]  # group 0: engine.param_groups
    masters = states["optimizer"]["fp32_groups"][0]
    assert torch.equal(exported[decay[-1]], masters[-1])

    # Two masters of the same shape swapped (as a different group order would): refused.
    i, j = [k for k, m in enumerate(masters) if m.shape == masters[2].shape][:2]
    masters[i], masters[j] = masters[j], masters[i]
    torch.save(states, checkpoint.path / "state" / MODEL_STATES)
    with pytest.raises(CheckpointError, match=f"the float32 master of {decay[i]} does not round"):
        model_weights(checkpoint)


def test_a_key_added_since_the_checkpoint_is_no_change_at_its_default(tmp_path):
    """A checkpoint written before ``loss.name`` existed resumes with it at its default
    (the behaviour from before), and is refused with it set otherwise."""
    from pathlib import Path

    from megabatch.trainer.checkpoint import Checkpoint
    from megabatch.trainer.config import plain_dict
    from megabatch.trainer.resume import config_changes, refused_changes

    config = load_config(None, ["task=simclr"])
    old = plain_dict(config)
    del old["loss"]["name"]  # as a checkpoint of an earlier megabatch recorded it
    checkpoint = Checkpoint(Path(tmp_path), 5, {"config": old})
    assert config_changes(checkpoint, config) == []
    other = load_config(None, ["task=simclr", "loss.name=ntxent"])
    changes = config_changes(checkpoint, other)
    assert [str(c) for c in refused_changes(changes)] == ["loss.name (absent) -> 'ntxent'"]
