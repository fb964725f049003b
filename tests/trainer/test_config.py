"""The config system: YAML + presets + overrides onto dataclasses; one-line errors."""

import pytest

from megabatch.trainer.config import (
    ConfigError,
    RunConfig,
    available_presets,
    dump_config,
    load_config,
    parse_override,
)


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_in_order(tmp_path):
    path = _write(tmp_path, "task: simclr\noptim:\n  lr: 0.1\n  betas: [0.8, 0.9]\n")
    config = load_config(path, ["optim.lr=3e-4", "batch.micro_batch_size=32", "data.train=[a, b]"])
    assert isinstance(config, RunConfig)
    assert config.task == "simclr"
    assert config.optim.lr == pytest.approx(3e-4)  # the override wins over the file
    assert config.optim.betas == (0.8, 0.9)
    assert config.batch.micro_batch_size == 32
    assert config.data.train == ["a", "b"]
    assert config.engine.zero_stage == 0  # untouched default


def test_preset_applies_under_the_file(tmp_path):
    assert "demo-clip" in available_presets()
    path = _write(tmp_path, "preset: demo-clip\ntrain:\n  max_steps: 7\n")
    config = load_config(path)
    assert config.train.max_steps == 7  # the file's key on top
    assert config.model.preset == "tiny"  # from the preset
    assert config.data.tokenizer == "data/digits/tokenizer.json"
    assert load_config(None, ["preset=demo-clip"]).train.max_steps == 200


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("optim:\n  lrr: 0.1\n", [], "unknown key optim.lrr"),
        ("", ["modle.preset=tiny"], "unknown key modle"),
        ("optim:\n  lr: fast\n", [], "optim.lr: expected a number, got 'fast'"),
        ("batch:\n  micro_batch_size: 2.5\n", [], "batch.micro_batch_size: expected an integer"),
        ("", ["engine.precision=fp8"], "engine.precision must be one of"),
        ("", ["optim.betas=[0.9]"], "optim.betas: expected a list of 2"),
        ("", ["data.resampled=maybe"], "data.resampled: expected true or false"),
        ("", ["data.decoder=turbo"], "data.decoder must be one of 'auto', 'pil', 'simplejpeg'"),
        ("optim: 3\n", [], "optim: expected a mapping"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("", ["preset=huge"], "preset must be one of"),
        ("", ["optim.lr"], "not of the form key=value"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_write(tmp_path, text), overrides)
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(_write(tmp_path, "a: [1, 2\n"))


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["batch.global_batch_size=100"], 2, "global_batch_size is 100 but .* = 64 x 1 x 2 = 128"),
        (["batch.accumulation_steps=0"], 1, "batch.accumulation_steps must be >= 1"),
        (["engine.zero_stage=4"], 1, "engine.zero_stage must be 0, 1, 2 or 3"),
        (["engine.zero_stage=3"], 1, "engine.zero_stage 3 is not supported yet"),
        (["loss.init_logit_scale=200"], 1, "loss.init_logit_scale must be in"),
        (["data.train=x"], 1, "data.tokenizer is required"),
    ],
)
def test_validation(overrides, world, message):
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate(world_size=world)


def test_global_batch_is_micro_times_accumulation_times_world():
    config = load_config(None, ["batch.micro_batch_size=64", "batch.accumulation_steps=4",
                                "batch.global_batch_size=512"])  # fmt: skip
    config.validate(world_size=2)
    assert config.global_batch_size(2) == 512


def test_dump_round_trips(tmp_path):
    config = load_config(None, ["preset=demo-clip", "optim.lr=1e-3"])
    dump_config(config, tmp_path / "config.yaml", extra={"git_revision": "abc123"})
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# git_revision: abc123")
    assert load_config(tmp_path / "config.yaml") == config


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=null") == {"a": None}
    assert parse_override("a=x y") == {"a": "x y"}
