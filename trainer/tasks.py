"""What differs between methods (CLIP, SimCLR, MoCo v3, BYOL, the pretext tasks), behind
one small interface, ``Task``, that the loop, evaluation and the checks before a run
use: the model, how a loader batch becomes model inputs, the named features of a
micro-batch (and a target network's, without grad), the learnt loss parameters, the
step's kind, what happens after each optimizer step, the method's own checkpointed
state, and which features evaluation reads. The loss itself is chosen by the config
(``loss.name``, trainer/losses.py) and handed to the task. Each method is a module of
trainer/methods/; ``TASKS`` maps ``task:`` in the config to its class, and nothing else
looks at the task's name. trainer/README.md: adding a method."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.trainer.config import RunConfig
from megabatch.trainer.losses import LossFn
from megabatch.trainer.methods.byol import ByolTask
from megabatch.trainer.methods.clip import ClipTask
from megabatch.trainer.methods.jigsaw import JigsawTask
from megabatch.trainer.methods.moco import MocoTask
from megabatch.trainer.methods.relative_patch import RelativePatchTask
from megabatch.trainer.methods.rotation import RotationTask
from megabatch.trainer.methods.simclr import SimCLRTask


class Task(Protocol):
    captions: ClassVar[bool]
    """Its samples carry captions: the loader tokenizes them (with the tokenizer handed
    in) and evaluation adds retrieval and zero-shot classification."""
    tokenizer: CaptionTokenizer | None
    """The one handed in (evaluation encodes class prompts with it); None without captions."""
    step_kind: ClassVar[str]
    """Which step trains it (trainer/step.py STEPS): "gradcache" where the loss couples
    every sample of the global batch (in-batch negatives: CLIP, SimCLR, MoCo v3);
    "accumulate", plain gradient accumulation, where it does not (BYOL, pretext tasks)."""

    def __init__(self, config: RunConfig, device: torch.device, world_size: int,
                 tokenizer: CaptionTokenizer | None): ...  # fmt: skip

    @staticmethod
    def check_model(config: RunConfig, vocab_size: int) -> None:
        """Before any process group: raise ValueError (one line) if the config's model
        keys cannot build this task's model."""

    def build_model(self) -> nn.Module: ...

    def inputs(self, batch, step: int, index: int) -> Any:
        """A loader ``Batch`` -> what ``encode`` takes, on the device (micro-batch
        ``index`` of ``step``: seeds that the GradCache re-run replays)."""

    def encode(self, model: nn.Module, micro) -> dict[str, torch.Tensor]:
        """The named (B, D) feature sets whose rows are positives of each other, in the
        order the loss takes them ({"image", "text"}; {"view1", "view2"})."""

    def targets(self, micro) -> dict[str, torch.Tensor]:
        """Named features that carry no gradient, computed once per micro-batch under
        no_grad (a momentum encoder's projections: MoCo's and BYOL's z1, z2); {} for
        most methods. The loss takes them beside ``encode``'s."""

    loss: LossFn
    """(features: name -> this rank's rows, params) -> the loss: ``losses.make_loss`` for
    the run's ``loss.name``. The GradCache step hands it every micro-batch's rows at
    once, the accumulation step one micro-batch's."""

    def loss_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The learnt loss parameters the loss takes, with grad (their gradient comes
        from the loss), by name: CLIP's {"logit_scale": exp(t), clamped}; {} where the
        loss has none (NT-Xent's temperature is a hyperparameter)."""

    def image_features(self, model: nn.Module, batch) -> torch.Tensor:
        """(B, D) features of a loader batch's images, for evaluation."""

    text_features: Callable[[nn.Module, Any], torch.Tensor] | None
    """(B, D) features of a batch's captions, where ``captions``; else None."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """After each step that updated the model (``step`` steps done): a momentum
        encoder's EMA. Not called for a step skipped for a non-finite loss."""

    def state_dict(self) -> dict:
        """The method's own state beyond the model (a target network's weights), saved in
        every checkpoint by rank 0 (checkpoint.save); {} for none. Tensors and plain
        containers only: it is read back weights-only."""

    def load_state_dict(self, state: dict) -> None:
        """On resume, every rank: what ``state_dict`` returned; ValueError (one line) if
        it cannot be (a checkpoint without the method's state)."""


# ``task:`` in the config -> the class (RunConfig.task lists the same names).
TASKS: dict[str, type[Task]] = {"clip": ClipTask, "simclr": SimCLRTask, "moco": MocoTask,
                                "byol": ByolTask, "rotation": RotationTask,
                                "relative_patch": RelativePatchTask, "jigsaw": JigsawTask}  # fmt: skip


def make_task(config: RunConfig, device: torch.device, world_size: int,
              tokenizer: CaptionTokenizer | None) -> Task:  # fmt: skip
    return TASKS[config.task](config, device, world_size, tokenizer)
