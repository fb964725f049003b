"""A downstream team's side of ``megabatch export --format onnx``, run as a script by
test_export_onnx.py: onnxruntime, NumPy, PIL and transformers (for the folder's image
processor and tokenizer) only. Neither megabatch nor torch can be imported here
(checked before anything else runs): the ONNX files need neither.

    python onnx_consumer.py clip|simclr DIR INPUTS OUT

INPUTS holds the raw held-out samples (NNNN.jpg, captions.json) and the trainer's own
model inputs for them (pixels.npy, tokens.npy, mask.npy), as test_export.py's
``_trainer_side`` writes them; OUT gets .npy arrays of what onnxruntime makes of them
and files.json (each file's inputs, outputs and metadata, as onnxruntime reads them).
"""

import sys
from pathlib import Path

from blocked_imports import block

# torch too: the ONNX files need neither (transformers' processors then run without it).
block("megabatch", "torch")

import json  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from PIL import Image  # noqa: E402


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _described(session: ort.InferenceSession) -> dict:
    """Names, element types and shapes (the dynamic axis by name), and the metadata."""
    meta = session.get_modelmeta()
    return {
        "inputs": [[a.name, a.type, a.shape] for a in session.get_inputs()],
        "outputs": [[a.name, a.type, a.shape] for a in session.get_outputs()],
        "metadata": dict(meta.custom_metadata_map),
        "description": meta.description,
    }


def _images(inputs: Path) -> list:
    return [Image.open(p) for p in sorted(inputs.glob("*.jpg"))]


def _card_snippet(folder: Path, image: Path, caption: str) -> dict:
    """The model card's onnxruntime snippet, run as written (DIR and the example image
    and caption replaced); its variables afterwards."""
    card = (folder / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", card, re.S)[-1]
    assert "onnxruntime" in code, code
    code = code.replace('"DIR', f'"{folder}').replace('"a photo of a dog"', json.dumps(caption))
    code = code.replace('"dog.jpg"', f'"{image}"').replace('"photo.jpg"', f'"{image}"')
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - our own card, in a test
    return scope


def clip(folder: Path, inputs: Path, out: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer

    image_tower = _session(folder / "image_encoder" / "model.onnx")
    text_tower = _session(folder / "text_encoder" / "model.onnx")
    processor = AutoImageProcessor.from_pretrained(folder / "image_encoder")
    tokenizer = AutoTokenizer.from_pretrained(folder / "text_encoder")
    captions = json.loads((inputs / "captions.json").read_text())
    pixels = processor(images=_images(inputs), return_tensors="np")["pixel_values"]
    text = tokenizer(captions, padding="max_length", truncation=True, return_tensors="np")
    ids, mask = text["input_ids"].astype(np.int64), text["attention_mask"].astype(np.int64)

    def embed_images(x):
        return image_tower.run(["image_embeds"], {"pixel_values": x})[0]

    def embed_texts(i, m):
        return text_tower.run(["text_embeds"], {"input_ids": i, "attention_mask": m})[0]

    results = {
        "raw_pixels": pixels, "raw_tokens": ids, "raw_mask": mask,
        "raw_image_embeds": embed_images(pixels), "raw_text_embeds": embed_texts(ids, mask),
        "raw_image_embeds_1": embed_images(pixels[:1]),
        "raw_text_embeds_1": embed_texts(ids[:1], mask[:1]),
        "image_embeds": embed_images(np.load(inputs / "pixels.npy")),
        "text_embeds": embed_texts(np.load(inputs / "tokens.npy"), np.load(inputs / "mask.npy")),
    }  # fmt: skip
    card = _card_snippet(folder, sorted(inputs.glob("*.jpg"))[0], captions[0])
    results.update(card_image_embeds=card["image_embeds"], card_text_embeds=card["text_embeds"],
                   card_logits=card["logits"])  # fmt: skip
    _write(out, results, {"image_encoder/model.onnx": _described(image_tower),
                          "text_encoder/model.onnx": _described(text_tower)})  # fmt: skip


def simclr(folder: Path, inputs: Path, out: Path) -> None:
    from transformers import AutoImageProcessor

    session = _session(folder / "model.onnx")
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=_images(inputs), return_tensors="np")["pixel_values"]

    def features(x):
        return session.run(["features"], {"pixel_values": x})[0]

    card = _card_snippet(folder, sorted(inputs.glob("*.jpg"))[0], "")
    results = {
        "raw_pixels": pixels, "raw_features": features(pixels),
        "raw_features_1": features(pixels[:1]),
        "features": features(np.load(inputs / "pixels.npy")),
        "card_features": card["features"],
    }  # fmt: skip
    _write(out, results, {"model.onnx": _described(session)})


def _write(out: Path, arrays: dict, files: dict) -> None:
    for name, value in arrays.items():
        np.save(out / f"{name}.npy", value)
    (out / "files.json").write_text(json.dumps(files))


if __name__ == "__main__":
    task, folder, inputs, out = sys.argv[1], *map(Path, sys.argv[2:5])
    {"clip": clip, "simclr": simclr}[task](folder, inputs, out)
