"""Launch-environment mapping (srun -> torch variables) and non-finite losses."""

import pytest
import torch

from megabatch.trainer.launch import first_host, slurm_to_torch_env
from tests.multiproc import run_ranks


def test_srun_environment_maps_to_torch_variables():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_JOB_ID": "123456"}  # fmt: skip
    mapped = slurm_to_torch_env(env)
    assert mapped == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
                      "MASTER_ADDR": "gpu03", "MASTER_PORT": str(20000 + 123456 % 20000)}  # fmt: skip
    assert slurm_to_torch_env({**env, "RANK": "0"}) == {}  # torchrun inside srun: left alone
    assert slurm_to_torch_env({}) == {}


@pytest.mark.parametrize(
    "nodelist,host",
    [("node07", "node07"), ("a1,b2", "a1"), ("gpu[03-06,09]", "gpu03"), ("x[7]", "x7")],
)
def test_first_host(nodelist, host, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol here
    assert first_host(nodelist) == host


@pytest.mark.parametrize(
    "env,resolved,refused",
    [
        ({"GROUP_WORLD_SIZE": "2"}, "127.0.1.1", True),  # torchrun, 2 nodes, Debian's hosts file
        ({"SLURM_NNODES": "3"}, "127.0.0.1", True),  # srun
        ({"GROUP_WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "eth0"}, "127.0.1.1", False),
        ({"GROUP_WORLD_SIZE": "2"}, "10.1.2.3", False),  # the name resolves to a real address
        ({"GROUP_WORLD_SIZE": "1"}, "127.0.1.1", False),  # one node: loopback is right
    ],
)
def test_a_gloo_run_across_nodes_refuses_a_loopback_address(env, resolved, refused, monkeypatch):
    from megabatch.trainer.config import ConfigError
    from megabatch.trainer.launch import check_gloo_address

    monkeypatch.setattr("socket.gethostname", lambda: "node7")
    monkeypatch.setattr("socket.gethostbyname", lambda name: resolved)
    if not refused:
        check_gloo_address(env)
        return
    with pytest.raises(ConfigError) as info:
        check_gloo_address(env)
    assert f"host's name 'node7' resolves to {resolved}" in str(info.value)
    assert "set GLOO_SOCKET_IFNAME" in str(info.value) and "\n" not in str(info.value)


def _nan_losses(rank, world_size, tmp, k):
    from megabatch.trainer.config import load_config
    from megabatch.trainer.launch import init_world
    from megabatch.trainer.train import NonFiniteLossError, Trainer

    overrides = [
        f"run_dir={tmp}/run", f"data.train={tmp}/train", f"data.tokenizer={tmp}/tok.json",
        "data.num_workers=0", "data.load_size=16", "model.image_size=16", "model.context_length=8",
        "batch.micro_batch_size=8", "train.max_steps=20", "train.log_every=1",
        "train.checkpoint_every_steps=2", "train.checkpoint_every_minutes=null",
        f"train.max_nonfinite_steps={k}",
    ]  # fmt: skip
    trainer = Trainer(load_config(None, overrides), init_world())
    real_loss = trainer.task.loss
    calls = {"n": 0}

    def loss_nan_from_step_3(features, params):
        calls["n"] += 1
        loss = real_loss(features, params)
        return loss * float("nan") if calls["n"] > 3 else loss

    trainer.task.loss = loss_nan_from_step_3
    before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    try:
        trainer.train()
    except NonFiniteLossError as exc:
        message = str(exc)
    else:
        message = None
    after = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    changed = any(not torch.equal(before[n], after[n]) for n in before)
    return message, trainer.step, changed


@pytest.mark.multiproc
def test_nonfinite_losses_skip_updates_then_stop_the_run(tmp_path):
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
    from tests.data_pipeline.fake_shards import captions, write_shards

    write_shards(tmp_path / "train", 64, per_shard=16)
    CaptionTokenizer.train(captions(64), vocab_size=300, context_length=8).save(
        tmp_path / "tok.json"
    )
    ((message, step, changed),) = run_ranks(_nan_losses, 1, str(tmp_path), 3, timeout_s=100)
    assert message is not None and "3 non-finite losses in a row" in message
    assert step == 5  # 3 good steps, 2 skipped ones; the 3rd non-finite one raised
    assert changed  # the good steps did update
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    # Step 4 (the first non-finite loss) is not saved: no checkpoint during a streak.
    assert checkpoints == ["step00000002"]
