"""A pretext task's whole run as a user starts it (tests/trainer/runs.py; jigsaw, the
family's most involved: nine jittered tiles, a permutation set): killed with SIGKILL
after a checkpoint and resumed, it ends with the parameters of a run never interrupted,
since its tiles and labels are drawn from (seed, step, micro-batch, rank) alone. The
finished run refuses a different permutation set and exports its backbone as SimCLR's
(the tiny set has no class labels: evaluation's probe and kNN are the demo runs')."""

import signal
import subprocess
import time

import pytest
import torch

from megabatch.trainer.config import ConfigError, load_config
from tests.trainer.runs import ROOT, command, env, overrides, train, weights

JIGSAW = {"task": "jigsaw", "model.preset": "tiny-resnet", "method.permutations": 24,
          "train.max_steps": 12}  # fmt: skip


def test_a_jigsaw_run_killed_and_resumed_ends_with_identical_parameters(data, tmp_path):
    whole = tmp_path / "whole"
    proc = train(overrides(data, whole, **JIGSAW))
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    killed = subprocess.Popen(command(overrides(data, run, **JIGSAW)), cwd=ROOT, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = run / "checkpoints" / "step00000003" / "COMPLETE"
    deadline = time.monotonic() + 90
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (run / "checkpoints" / "step00000012").exists(), "the run ended before the kill"

    resumed = train(overrides(data, run, **JIGSAW))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    want = weights(whole / "checkpoints" / "step00000012")
    got = weights(run / "checkpoints" / "step00000012")
    assert want.keys() == got.keys()
    assert {k.split(".")[0] for k in want} == {"encoder", "head"}
    assert want["head.3.weight"].shape[0] == 24  # one class per permutation
    for name in want:
        assert torch.equal(got[name], want[name]), name

    _refuses_other_permutations(data, whole)
    _exports_the_backbone(whole, want, tmp_path / "export")


def _refuses_other_permutations(data, run):
    from megabatch.trainer.resume import plan_resume

    config = load_config(None, overrides(data, run, **{**JIGSAW, "method.permutations": 30}))
    with pytest.raises(ConfigError, match="method.permutations 24 -> 30"):
        plan_resume(config, world_size=1)


def _exports_the_backbone(run, module, out):
    """SimCLR's export path: the encoder's weights as a transformers ResNetModel, the
    classifier dropped."""
    from transformers import ResNetModel

    from megabatch.trainer.export import export, plan_export

    export(plan_export(run, out=out, formats="hf"))
    encoder = ResNetModel.from_pretrained(out)
    exported = encoder.state_dict()
    assert exported.keys() == {k[len("encoder.") :] for k in module if k.startswith("encoder.")}
    for name, value in exported.items():
        assert torch.equal(value, module[f"encoder.{name}"]), name
