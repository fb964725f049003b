"""The data pipeline's configs built from the run config (trainer/data.py): the one
place the run's keys reach the image config, the loaders and the tokenizer."""

import pytest

from megabatch.trainer.config import ConfigError, load_config
from megabatch.trainer.data import EVAL_BATCH_SIZE, image_config, load_tokenizer, loader_config
from tests.trainer.runs import overrides


def test_data_keys_reach_the_workers_image_config():
    config = load_config(None, ["data.decoder=pil", "data.load_size=40", "model.image_size=32",
                                "data.max_image_pixels=4096"])  # fmt: skip
    image = image_config(config)
    assert (image.decoder, image.load_size, image.size) == ("pil", 40, 32)
    assert image.max_pixels == 4096
    assert image_config(load_config(None)).decoder == "auto"


def test_the_training_loader_reads_this_ranks_micro_batches():
    config = load_config(None, ["seed=7", "batch.micro_batch_size=12", "data.num_workers=3",
                                "data.shuffle_block=50", "data.resampled=true",
                                "data.max_member_bytes=1000", "model.image_size=32"])  # fmt: skip
    loader = loader_config(config, "shards/train", captions=True)
    assert (loader.shards, loader.captions, loader.seed) == ("shards/train", True, 7)
    assert (loader.batch_size, loader.num_workers, loader.shuffle_block) == (12, 3, 50)
    assert loader.resampled and loader.drop_last  # ranks step together on full batches
    assert loader.max_member_bytes == 1000
    assert loader.image == image_config(config)


def test_evaluation_reads_every_sample_once_in_order():
    config = load_config(None, ["seed=7", "data.num_workers=3", "data.resampled=true",
                                "data.max_member_bytes=1000"])  # fmt: skip
    loader = loader_config(config, "shards/val", captions=False, evaluation=True)
    assert (loader.captions, loader.seed, loader.shuffle_block) == (False, 0, 1)
    assert (loader.batch_size, loader.num_workers) == (EVAL_BATCH_SIZE, 0)
    assert not loader.resampled and not loader.drop_last and not loader.pin_memory
    assert loader.max_member_bytes == 1000  # the caps hold for evaluation too


def test_the_tokenizer_loads_at_the_models_context_length(data, tmp_path):
    config = load_config(None, overrides(data, tmp_path / "run", **{"model.context_length": 6}))
    assert load_tokenizer(config).context_length == 6
    (tmp_path / "bad.json").write_text("{not json")
    for value, message in [(tmp_path / "none.json", "data.tokenizer: no tokenizer file at"),
                           (tmp_path / "bad.json", "data.tokenizer: cannot load"),
                           ("null", "data.tokenizer is required")]:  # fmt: skip
        bad = load_config(None, overrides(data, tmp_path / "run", **{"data.tokenizer": value}))
        with pytest.raises(ConfigError, match=message) as caught:
            load_tokenizer(bad)
        assert "\n" not in str(caught.value)
