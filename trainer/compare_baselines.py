"""The two baselines ``megabatch compare`` puts under every method, each evaluated by
``eval_run.evaluate``, the code a trained run's final evaluation runs, so that the linear
probe and kNN see the same samples (``data.eval_max_samples`` of each split) and the
same protocol as the methods they are compared with:

- raw pixels: each image exactly as evaluation hands it to a model
  (``device_preprocess``: the workers' side, resized to ``model.image_size``, CLIP's
  mean and std), flattened: (B, 3, S, S) -> (B, 3 S^2). What a method must beat to have
  learnt anything a linear classifier could not find in the pixels themselves.
- a random backbone: the run's model untrained, built as ``Trainer`` builds it
  (``torch.manual_seed(config.seed)`` then ``task.build_model()``: a run's step-0
  weights), its features read as a trained run's are (``task.image_features``). What
  the architecture gives before any training: the floor every method must clear.
"""

from __future__ import annotations

import torch
from torch import nn

from megabatch.data_pipeline.read.transforms import device_preprocess
from megabatch.trainer.config import RunConfig
from megabatch.trainer.data import image_config
from megabatch.trainer.eval_run import evaluate
from megabatch.trainer.tasks import TASKS


class RawPixels:
    """The evaluation side of a ``tasks.Task`` whose features are the model's input
    pixels (no model: ``evaluate`` is handed an ``nn.Identity`` it never calls)."""

    captions = False
    tokenizer = None
    text_features = None

    def __init__(self, config: RunConfig):
        self.image = image_config(config)

    def image_features(self, model: nn.Module, batch) -> torch.Tensor:
        return device_preprocess(batch.images, self.image).flatten(1)  # (B, 3 S^2)


def raw_pixels(config: RunConfig) -> dict[str, float]:
    """``evaluate``'s results (linear probe and kNN top-1) on the pixels themselves."""
    return evaluate(RawPixels(config), nn.Identity(), config)


def untrained_model(config: RunConfig) -> tuple[object, nn.Module]:
    """(task, model) on the CPU: ``config``'s model with the weights a run of it starts
    from (the seed set right before the model is built, as ``Trainer`` does)."""
    task = TASKS[config.task](config, torch.device("cpu"), 1, None)
    torch.manual_seed(config.seed)
    return task, task.build_model()


def random_backbone(config: RunConfig) -> dict[str, float]:
    """``evaluate``'s results for ``config``'s model before its first step."""
    task, model = untrained_model(config)
    return evaluate(task, model, config)
