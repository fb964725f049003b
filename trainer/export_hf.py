"""A checkpoint's weights -> transformers objects, and their Hugging Face folder.

The towers are transformers classes already (models/clip.py, models/simclr.py), so the
export is a renaming of keys, not a conversion:

- CLIP: ``clip.<key>`` -> ``CLIPModel``'s ``<key>``. The trained scale is
  ``log_logit_scale`` (a (1,) parameter, see ``ClipModel``); it is written as
  ``logit_scale``, clamped as the trainer clamps it (``loss.max_logit_scale``), so that
  ``CLIPModel``'s ``logits_per_image`` use the scale the model was trained with. The
  stale ``clip.logit_scale`` buffer is not exported. The single towers are the same
  weights under ``CLIPVisionModelWithProjection`` (``vision_model.*``,
  ``visual_projection.*``) and ``CLIPTextModelWithProjection`` (``text_model.*``,
  ``text_projection.*``).
- SimCLR and the other image-only methods: ``encoder.<key>`` -> the ``ResNetModel`` /
  ``ViTModel``'s ``<key>``; the method's heads (SimCLR's ``head.*``, MoCo's and BYOL's
  ``projector.*`` and ``predictor.*``, a pretext task's classifier) are dropped.

The tokenizer is the run's tokenizer.json as ``PreTrainedTokenizerFast`` (start, end and
pad tokens named, ``model_max_length`` the context length); the image processor is a
``CLIPImageProcessor`` (PIL backend) doing the trainer's evaluation pipeline: the
centred square at ``model.image_size`` (antialiased bilinear), /255, the run's mean and
std. docs/export.md says where the two pipelines can differ and by how much.

Everything is written with ``save_pretrained``: config JSON and safetensors, no pickle.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn

from megabatch.data_pipeline.read.tokenizer import EOT, PAD, SOT, CaptionTokenizer
from megabatch.data_pipeline.read.transforms import ImageConfig

IMAGE_ENCODER, TEXT_ENCODER = "image_encoder", "text_encoder"


class WeightsMismatch(ValueError):
    """The checkpoint's weights are not those of the model the run's config describes."""


def _load_exactly(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``state`` into ``model``, every key and shape matching, as float32; a one-line
    WeightsMismatch naming the first few differences otherwise."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]  # fmt: skip
    problems = [("missing", missing), ("unexpected", unexpected), ("shape", shapes)]
    said = [f"{kind} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for kind, keys in problems if keys]  # fmt: skip
    if said:
        raise WeightsMismatch(f"the checkpoint does not hold {what}: " + "; ".join(said))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


# --------------------------------------------------------------------------- CLIP
def clip_model(config, module: dict[str, torch.Tensor], max_logit_scale: float):
    """transformers ``CLIPModel`` (float32, eval mode) from a ``ClipModel`` state dict.
    ``config`` is the ``CLIPConfig`` the trainer built (models.clip.clip_config)."""
    from transformers import CLIPModel

    for sub in (config.text_config, config.vision_config):
        # The single-tower classes build their projection from the sub-config's own
        # projection_dim (default 512), not the top-level one.
        sub.projection_dim = config.projection_dim
    state = {k[len("clip.") :]: v for k, v in module.items() if k.startswith("clip.")}
    state.pop("logit_scale", None)  # the stale buffer: the trained value is log_logit_scale
    extra = [k for k in module
             if not k.startswith("clip.") and k not in ("log_logit_scale", "logit_bias")]  # fmt: skip
    if "log_logit_scale" not in module or extra:
        raise WeightsMismatch(
            "the checkpoint does not hold a CLIP model: "
            + (f"unexpected {', '.join(extra[:3])}" if extra else "no log_logit_scale")
        )
    t = module["log_logit_scale"].float().reshape(())
    state["logit_scale"] = t.clamp(max=math.log(max_logit_scale))
    model = CLIPModel(config)
    _load_exactly(model, state, "the CLIP model of the run's config")
    if "logit_bias" in module:
        # Trained with SigLIP's loss. CLIPModel has no bias (its softmax logits need none);
        # config.json keeps it for match probabilities, sigmoid(scale x cos + bias).
        model.config.logit_bias = float(module["logit_bias"].float().reshape(()))
    return model.eval()


def clip_towers(model):
    """(``CLIPVisionModelWithProjection``, ``CLIPTextModelWithProjection``) with
    ``model``'s weights."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    state = model.state_dict()
    towers = []
    for cls, sub, prefixes in (
        (CLIPVisionModelWithProjection, model.config.vision_config, ("vision_model.", "visual_projection.")),
        (CLIPTextModelWithProjection, model.config.text_config, ("text_model.", "text_projection.")),
    ):  # fmt: skip
        tower = cls(sub)
        _load_exactly(tower, {k: v for k, v in state.items() if k.startswith(prefixes)},
                      f"the {cls.__name__}")  # fmt: skip
        towers.append(tower.eval())
    return tuple(towers)


def clip_tokenizer(tokenizer: CaptionTokenizer):
    """The caption tokenizer as transformers sees it: ``<|startoftext|> ... <|endoftext|>``,
    truncated before the end token at ``model_max_length`` (the context length), padded
    with ``<pad>`` on the right; call it with ``padding="max_length", truncation=True``
    for the trainer's exact ids and mask."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.tokenizer.to_str()),
        bos_token=SOT, eos_token=EOT, pad_token=PAD,
        model_max_length=tokenizer.context_length, padding_side="right",
    )  # fmt: skip


# --------------------------------------------------------------------------- SimCLR
def simclr_encoder(preset: str, image_size: int, module: dict[str, torch.Tensor]):
    """The backbone of an image-only method (SimCLR, MoCo v3, BYOL, the pretext tasks:
    ``ResNetModel`` or ``ViTModel``, float32, eval mode): the ``encoder.*`` weights; the
    method's heads (projection, predictor, classifier) are dropped."""
    from megabatch.trainer.models.simclr import image_backbone

    if not any(k.startswith("encoder.") for k in module):
        raise WeightsMismatch(f"the checkpoint holds no image backbone (no encoder.* weights; "
                              f"found {', '.join(list(module)[:3])})")  # fmt: skip
    encoder, _ = image_backbone(preset, image_size)
    state = {k[len("encoder.") :]: v for k, v in module.items() if k.startswith("encoder.")}
    _load_exactly(encoder, state, f"the {preset} backbone of the run's config")
    return encoder.eval()


# --------------------------------------------------------------------------- both
def image_processor(image: ImageConfig):
    """``CLIPImageProcessor`` for the trainer's evaluation pixels: shorter side to
    ``image.size`` (antialiased bilinear), centre crop to a square, /255, mean and std."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image.size}, resample=Image.Resampling.BILINEAR,
        do_center_crop=True, crop_size={"height": image.size, "width": image.size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(image.mean), image_std=list(image.std), do_convert_rgb=True,
    )  # fmt: skip


# The files that read the inputs are written for every format (ONNX files sit beside
# them); the transformers weights and configs only for --format hf.
def write_clip_processors(folder: Path, tokenizer, processor) -> None:
    """DIR: tokenizer + preprocessor_config.json; DIR/image_encoder the latter,
    DIR/text_encoder the former: what each tower needs to read its input."""
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    processor.save_pretrained(folder / IMAGE_ENCODER)
    tokenizer.save_pretrained(folder / TEXT_ENCODER)


def write_clip_model(folder: Path, model) -> None:
    """DIR: CLIPModel; DIR/image_encoder and DIR/text_encoder: the single towers."""
    model.save_pretrained(folder)
    vision, text = clip_towers(model)
    vision.save_pretrained(folder / IMAGE_ENCODER)
    text.save_pretrained(folder / TEXT_ENCODER)


def write_simclr_processor(folder: Path, processor) -> None:
    processor.save_pretrained(folder)


def write_simclr_model(folder: Path, encoder) -> None:
    encoder.save_pretrained(folder)
