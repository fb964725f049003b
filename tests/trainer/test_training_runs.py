"""Whole training runs as a user starts them (``megabatch train``, ``megabatch launch``),
on tiny shards (tests/trainer/runs.py): 2-rank DeepSpeed with ZeRO 1 and 2, a SIGKILL-ed
run resumed to the same parameters as an uninterrupted one, half-written checkpoints
ignored, bad configs refused before any process group starts, and evaluation of a run.
Signals: test_signals.py and test_launcher.py."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.trainer.runs import ROOT, command, env, overrides, train, weights


@pytest.mark.multiproc
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_train_checkpoint_and_evaluate(data, tmp_path, zero_stage):
    run = tmp_path / "run"
    proc = train(overrides(data, run, **{"engine.zero_stage": zero_stage}), ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "megabatch launch:" not in proc.stderr  # the ranks agreed: nothing to explain
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
    assert train(overrides(data, whole) + steps).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen(command(overrides(data, run) + steps), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = run / "checkpoints" / "step00000003" / "COMPLETE"
    deadline = time.monotonic() + 90
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "step00000012").exists(), "the run ended before the kill"

    resumed = train(overrides(data, run) + steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want = weights(whole / "checkpoints" / "step00000012")
    got = weights(run / "checkpoints" / "step00000012")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_half_written_checkpoints_are_ignored(data, tmp_path):
    run = tmp_path / "run"
    assert train(overrides(data, run)).returncode == 0
    checkpoints = run / "checkpoints"
    (checkpoints / "step00000009").mkdir()  # killed before its COMPLETE marker
    (checkpoints / "step00000009" / "meta.json").write_text("{garbage")
    (checkpoints / ".tmp-step00000012").mkdir()  # killed while writing
    proc = train(overrides(data, run, **{"train.max_steps": 8}))
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
    proc = train(overrides(data, tmp_path / "run") + [override])
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - start < 30


def test_eval_command_reloads_the_newest_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    assert train(overrides(data, run)).returncode == 0
    (run / "results.json").unlink()
    proc = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "eval", str(run)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating" in proc.stderr and "step00000006" in proc.stderr
    assert '"retrieval_i2t_r1"' in proc.stdout
    assert (run / "results.json").is_file()


def test_clip_trains_with_the_siglip_loss_and_exports_its_bias(data, tmp_path):
    """loss.name=siglip: the CLIP towers with a learnt logit bias (t = 10, b = -10 at the
    start), trained through the fused SigLIP loss; the export keeps the trained bias."""
    import json

    run = tmp_path / "run"
    proc = train(overrides(data, run, **{"loss.name": "siglip", "train.max_steps": 3,
                                         "train.checkpoint_every_steps": 3}))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scales = [r["logit_scale"] for r in logged if "logit_scale" in r]
    assert abs(scales[0] - 10.0) < 0.1  # SigLIP's t, not CLIP's 1 / 0.07
    module = weights(run / "checkpoints" / "step00000003")
    bias = module["logit_bias"].item()
    assert bias != -10.0 and abs(bias + 10.0) < 1.0  # trained, from -10

    export = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "export", str(run),
                             "--out", str(tmp_path / "export")], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=100)  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["logit_bias"] == pytest.approx(bias, abs=1e-6)
    assert (
        "- loss: siglip (SigLIP's pairwise sigmoid"
        in (tmp_path / "export" / "README.md").read_text()
    )


def test_simclr_trains_with_the_margin_loss(data, tmp_path):
    import json
    import math

    run = tmp_path / "run"
    proc = train(overrides(data, run, task="simclr", **{"model.preset": "tiny-resnet",
                                                       "loss.name": "margin",
                                                       "train.max_steps": 3}))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert all(math.isnan(r["logit_scale"]) for r in logged if "logit_scale" in r)
    assert "scale -" in proc.stderr
