"""A downstream team's side of ``megabatch export``, run as a script by test_export.py:
transformers, PIL and NumPy only. megabatch cannot be imported here (blocked_imports.py
blocks it and everything under it, checked before anything else runs).

    python export_consumer.py clip|simclr DIR INPUTS OUT

INPUTS holds the raw held-out samples (NNN.jpg, captions.json) and the trainer's own
model inputs for them (pixels.npy, tokens.npy, mask.npy); OUT gets .npy arrays of what
transformers makes of them.
"""

import json
import sys
from pathlib import Path

from blocked_imports import block

block("megabatch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def _save(out: Path, name: str, value) -> None:
    np.save(
        out / f"{name}.npy", value.detach().float().numpy() if torch.is_tensor(value) else value
    )


def clip(folder: Path, inputs: Path, out: Path) -> None:
    from transformers import (
        CLIPModel,
        CLIPProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    images = [Image.open(p) for p in sorted(inputs.glob("*.jpg"))]
    captions = json.loads((inputs / "captions.json").read_text())
    raw = processor(text=captions, images=images, padding="max_length", truncation=True,
                    return_tensors="pt")  # fmt: skip
    pixels = torch.from_numpy(np.load(inputs / "pixels.npy"))
    tokens = torch.from_numpy(np.load(inputs / "tokens.npy"))
    mask = torch.from_numpy(np.load(inputs / "mask.npy"))
    with torch.no_grad():
        from_raw = model(**raw)
        from_trainer = model(input_ids=tokens, attention_mask=mask, pixel_values=pixels)
        vision = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").eval()
        text = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").eval()
        tower_image = vision(pixel_values=raw["pixel_values"]).image_embeds
        tower_text = text(
            input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]
        ).text_embeds
    _save(out, "raw_pixels", raw["pixel_values"])
    _save(out, "raw_tokens", raw["input_ids"].numpy())
    _save(out, "raw_mask", raw["attention_mask"].numpy())
    _save(out, "raw_image_embeds", from_raw.image_embeds)  # CLIPModel normalises them
    _save(out, "raw_text_embeds", from_raw.text_embeds)
    _save(out, "image_embeds", from_trainer.image_embeds)
    _save(out, "text_embeds", from_trainer.text_embeds)
    _save(out, "tower_image_embeds", torch.nn.functional.normalize(tower_image, dim=-1))
    _save(out, "tower_text_embeds", torch.nn.functional.normalize(tower_text, dim=-1))
    _save(out, "logit_scale", model.logit_scale.exp().reshape(1))


def simclr(folder: Path, inputs: Path, out: Path) -> None:
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    images = [Image.open(p) for p in sorted(inputs.glob("*.jpg"))]
    raw = processor(images=images, return_tensors="pt")
    pixels = torch.from_numpy(np.load(inputs / "pixels.npy"))
    with torch.no_grad():
        _save(out, "raw_features", model(pixel_values=raw["pixel_values"]).pooler_output.flatten(1))
        _save(out, "features", model(pixel_values=pixels).pooler_output.flatten(1))
    _save(out, "raw_pixels", raw["pixel_values"])
    _save(out, "model_class", np.array(type(model).__name__))


if __name__ == "__main__":
    task, folder, inputs, out = sys.argv[1], *map(Path, sys.argv[2:5])
    {"clip": clip, "simclr": simclr}[task](folder, inputs, out)
