"""Every mistake ``megabatch train`` / ``eval`` can see before starting is one line naming
the key or the file, exit status 2, before any process group or model exists."""

import pytest
import torch.distributed as dist

from megabatch.trainer.cli import main
from tests.trainer.runs import ZERO2, overrides


def _run_cli(capsys, argv):
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not dist.is_initialized()
    return status, err


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"data.train": "/nonexistent/shards"}, "data.train: no such file or folder"),
        ({"data.train": "{tmp}/{{00000..00003}}.tar"}, "matches no existing shard"),
        ({"data.val": "/nonexistent/val"}, "data.val: no such file or folder"),
        ({"data.train": "[]"}, "data.train is empty"),
        ({"data.train": "''"}, "data.train is empty"),
        ({"data.tokenizer": "/nonexistent/tok.json"}, "data.tokenizer: no tokenizer file at"),
        ({"data.tokenizer": "{tmp}/garbage.json"}, "data.tokenizer: cannot load"),
        ({"model.preset": "huge"}, "model.preset must be one of"),
        ({"model.image_size": 18}, "not a multiple of the tiny patch size"),
        ({"model.embed_dim": 0}, "model.embed_dim must be >= 1"),
        ({"data.load_size": -4}, "data.load_size must be >= 8"),
        ({"optim.betas": "[0.9, 1.0]"}, "optim.betas must be in [0, 1)"),
        ({"optim.lr": ".nan"}, "optim.lr: expected a finite number"),
        ({"optim.lr": "inf"}, "optim.lr: expected a finite number"),
        ({"optim.lr": -1}, "optim.lr must be > 0"),
        ({"optim.eps": -1e-8}, "optim.eps must be >= 0"),
        ({"optim.grad_clip": -1}, "optim.grad_clip must be > 0"),
        ({"train.checkpoint_every_minutes": -5}, "train.checkpoint_every_minutes must be > 0"),
        ({"train.checkpoint_every_steps": 0}, "train.checkpoint_every_steps must be >= 1"),
        ({"train.eval_every": -1}, "train.eval_every must be >= 1"),
        ({"train.keep_checkpoints": 0}, "train.keep_checkpoints must be >= 1"),
        ({"train.collective_timeout_s": 0}, "train.collective_timeout_s must be > 0"),
        ({"train.resume": "/nonexistent/step00000004"}, "train.resume: no checkpoint directory"),
        ({"train.resume": "{tmp}"}, "is not a complete checkpoint"),
    ],
)
def test_train_mistakes_are_one_line(data, tmp_path, capsys, extra, message):
    (tmp_path / "garbage.json").write_text("{not json")
    extra = {k: str(v).format(tmp=tmp_path) for k, v in extra.items()}
    run = tmp_path / "run"
    status, err = _run_cli(capsys, ["train", *overrides(data, run, **extra)])
    assert status == 2
    assert len(err) == 1 and err[0].startswith("megabatch train: error: "), err
    assert message in err[0]
    assert not run.exists()


def test_yaml_syntax_error_gives_line_and_column(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("task: clip\noptim:\n  lr: [1, 2\n")
    status, err = _run_cli(capsys, ["train", str(path)])
    assert status == 2 and len(err) == 1
    assert f"cannot read config file {path}: line 4, column 1: expected ',' or ']'" in err[0]


def test_resume_with_another_world_size_is_refused(data, zero2_run, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    status, err = _run_cli(capsys, ["train", *overrides(data, zero2_run, **ZERO2)])
    assert status == 2 and len(err) == 1
    assert "with 2 rank(s): it was written by 1" in err[0]


def test_eval_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    status, err = _run_cli(capsys, ["eval", str(tmp_path / "elsewhere")])
    assert status == 2 and len(err) == 1 and "config file not found" in err[0]
