"""MoCo v3 and BYOL runs as a user starts them (tests/trainer/runs.py's tiny shards): a
run SIGKILL-ed after its first checkpoint and resumed ends with the same weights and the
same target network as one that was never stopped (the target, the method's own state,
is in every checkpoint: method.pt); a checkpoint without it is refused in one line; the
export is the online backbone."""

import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.trainer.runs import ROOT, command, env, overrides, train, weights

STEPS = {"train.max_steps": 8, "train.checkpoint_every_steps": 3, "model.preset": "tiny-resnet",
         "model.embed_dim": 16, "model.hidden_dim": 32}  # fmt: skip


def _method_state(checkpoint):
    return torch.load(checkpoint / "method.pt", weights_only=True)["target"]


@pytest.mark.parametrize("task", ["moco", "byol"])
def test_sigkill_then_resume_ends_with_identical_weights_and_target(data, tmp_path, task):
    whole = tmp_path / "whole"
    proc = train(overrides(data, whole, task=task, **STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(command(overrides(data, run, task=task, **STEPS)), cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = run / "checkpoints" / "step00000003" / "COMPLETE"
    deadline = time.monotonic() + 90
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "step00000008").exists(), "the run ended before the kill"

    resumed = train(overrides(data, run, task=task, **STEPS))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    for got, want in ((weights(run / "checkpoints" / "step00000008"),
                       weights(whole / "checkpoints" / "step00000008")),
                      (_method_state(run / "checkpoints" / "step00000008"),
                       _method_state(whole / "checkpoints" / "step00000008"))):  # fmt: skip
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
    # The target moved away from its start, and is not the online network.
    start = _method_state(run / "checkpoints" / "step00000003")
    final = _method_state(whole / "checkpoints" / "step00000008")
    online = weights(whole / "checkpoints" / "step00000008")
    key = "encoder.embedder.embedder.convolution.weight"
    assert not torch.equal(start[key], final[key]) and not torch.equal(final[key], online[key])

    if task == "moco":  # one of the two: the export is the online f, heads dropped
        _check_export(whole, online, tmp_path / "export")
    else:
        _check_refused_without_target(data, run, tmp_path / "no-target", task)


def _check_export(run, online, folder):
    from safetensors.torch import load_file

    proc = subprocess.run(command([str(run), "--out", str(folder), "--format", "hf"],
                                  subcommand="export"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(folder / "model.safetensors")
    encoder = {k[len("encoder.") :]: v for k, v in online.items() if k.startswith("encoder.")}
    assert exported.keys() == encoder.keys()
    assert all(torch.equal(exported[k], encoder[k].float()) for k in encoder)


def _check_refused_without_target(data, run, copy, task):
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step00000008" / "method.pt").unlink()
    proc = train(overrides(data, copy, task=task, **{**STEPS, "train.max_steps": 9}))
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "no target network" in line]
    assert said and "step00000008" in said[0], proc.stderr[-2000:]
