"""The methods behind the loop's one interface (trainer/tasks.py): which task has
captions, the tokenizer handed in, the model checks before a run, and the loss over the
features each task encodes."""

import inspect
import math

import pytest
import torch

from megabatch.kernels import clip_loss, ntxent_loss
from megabatch.trainer.config import load_config
from megabatch.trainer.data import load_tokenizer
from megabatch.trainer.step import STEPS
from megabatch.trainer.tasks import TASKS, ClipTask, SimCLRTask, Task, make_task
from tests.trainer.runs import overrides

CPU = torch.device("cpu")


def test_every_config_task_has_a_class_with_the_whole_interface():
    import typing

    from megabatch.trainer.config import RunConfig

    task_names = typing.get_args(typing.get_type_hints(RunConfig)["task"])
    assert set(TASKS) == set(task_names)
    wanted = {name for name in dir(Task) if not name.startswith("_")} | set(Task.__annotations__)
    for cls in TASKS.values():
        # tokenizer and loss are set by __init__ (test_each_tasks_loss_... checks them)
        missing = {name for name in wanted if not hasattr(cls, name)} - {"tokenizer", "loss"}
        assert not missing, f"{cls.__name__} lacks {missing}"
        assert isinstance(cls.captions, bool)
        assert cls.step_kind in STEPS, cls
        assert list(inspect.signature(cls.__init__).parameters)[1:] == [
            "config", "device", "world_size", "tokenizer"]  # fmt: skip
    assert TASKS["clip"].captions and not TASKS["simclr"].captions


def test_clip_uses_the_tokenizer_it_is_handed(data, tmp_path):
    config = load_config(None, overrides(data, tmp_path / "run"))
    tokenizer = load_tokenizer(config)
    task = make_task(config, CPU, 1, tokenizer)
    assert isinstance(task, ClipTask) and task.tokenizer is tokenizer
    model = task.build_model()
    assert model.clip.config.text_config.vocab_size == tokenizer.vocab_size
    with pytest.raises(ValueError, match="needs the caption tokenizer"):
        make_task(config, CPU, 1, None)


def test_model_checks_before_a_run_name_the_problem():
    with pytest.raises(ValueError, match="nope"):
        ClipTask.check_model(load_config(None, ["model.preset=nope"]), vocab_size=100)
    with pytest.raises(ValueError, match="nope"):
        SimCLRTask.check_model(load_config(None, ["task=simclr", "model.preset=nope"]), 1)
    ClipTask.check_model(load_config(None, ["model.preset=tiny"]), vocab_size=100)


def test_each_tasks_loss_is_the_fused_one_on_its_features(data, tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    clip_config = load_config(None, overrides(data, tmp_path / "run"))
    clip = make_task(clip_config, CPU, 1, load_tokenizer(clip_config))
    scale = torch.tensor(10.0)
    features = clip.encode(clip.build_model(), clip.inputs(_one_batch(clip_config), 0, 0))
    assert list(features) == ["image", "text"]
    assert torch.equal(clip.loss({"image": a, "text": b}, {"logit_scale": scale}),
                       clip_loss(a, b, scale))  # fmt: skip
    assert list(clip.loss_params(clip.build_model())) == ["logit_scale"]
    simclr_config = load_config(None, [*overrides(data, tmp_path / "run", task="simclr"),
                                       "model.preset=tiny-resnet",
                                       "loss.temperature=0.2"])  # fmt: skip
    simclr = make_task(simclr_config, CPU, 1, None)
    assert simclr.loss_params(simclr.build_model()) == {}
    assert simclr.text_features is None and simclr.tokenizer is None
    assert torch.equal(simclr.loss({"view1": a, "view2": b}, {}), ntxent_loss(a, b, 0.2))


def _one_batch(config):
    from megabatch.data_pipeline.read.loader import ShardLoader
    from megabatch.trainer.data import loader_config

    loader = ShardLoader(loader_config(config, config.data.val, captions=True, evaluation=True),
                         tokenizer=load_tokenizer(config))  # fmt: skip
    return next(iter(loader))


def test_the_loss_is_chosen_by_the_config_and_must_fit_the_task():
    import typing

    from megabatch.trainer.config import ConfigError, RunConfig
    from megabatch.trainer.losses import LOSSES, TASK_LOSS, check_loss, loss_name

    hints = typing.get_type_hints(typing.get_type_hints(RunConfig)["loss"])
    assert set(typing.get_args(typing.get_args(hints["name"])[0])) == set(LOSSES)
    assert {loss_name(load_config(None, [f"task={t}"])) for t in TASK_LOSS} == set(
        TASK_LOSS.values()
    )
    check_loss(load_config(None, ["loss.name=infonce"]))
    with pytest.raises(
        ConfigError, match="loss.name 'ntxent' does not fit task clip .choose from infonce"
    ):
        check_loss(load_config(None, ["loss.name=ntxent"]))
    with pytest.raises(ConfigError, match="loss.name must be one of"):
        load_config(None, ["loss.name=hinge"])


def test_siglip_gives_the_clip_model_a_learnt_bias_and_the_fused_loss(data, tmp_path):
    from megabatch.kernels import siglip_loss

    config = load_config(None, [*overrides(data, tmp_path / "run"), "loss.name=siglip"])
    task = make_task(config, CPU, 1, load_tokenizer(config))
    params = task.loss_params(task.build_model())
    assert list(params) == ["logit_scale", "logit_bias"]
    assert params["logit_scale"].item() == pytest.approx(10.0, rel=1e-6)  # SigLIP's t, b
    assert params["logit_bias"].item() == -10.0 and params["logit_bias"].requires_grad
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    t, bias = torch.tensor(10.0), torch.tensor(-10.0)
    got = task.loss({"image": a, "text": b}, {"logit_scale": t, "logit_bias": bias})
    assert torch.equal(got, siglip_loss(a, b, t, bias))


def test_the_margin_loss_takes_simclrs_views_with_its_margin(data, tmp_path):
    from megabatch.kernels import margin_contrastive_loss
    from megabatch.trainer.config import ConfigError
    from megabatch.trainer.losses import check_loss, logged_scale

    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    config = load_config(None, [*overrides(data, tmp_path / "run", task="simclr"),
                                "model.preset=tiny-resnet", "loss.name=margin",
                                "loss.margin=0.5"])  # fmt: skip
    task = make_task(config, CPU, 1, None)
    assert task.loss_params(task.build_model()) == {}
    got = task.loss({"view1": a, "view2": b}, {})
    assert torch.equal(got, margin_contrastive_loss(a, b, 0.5))
    assert math.isnan(logged_scale(config, {}))  # no logits, no scale
    with pytest.raises(ConfigError, match="loss.name 'margin' does not fit task clip"):
        check_loss(load_config(None, ["loss.name=margin"]))
