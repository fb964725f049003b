"""Zero-shot classification as a downstream team writes it from a ``megabatch export``
folder alone, run as a script by test_export_demo.py: transformers (or onnxruntime),
PIL and NumPy; megabatch cannot be imported here (checked before anything else runs).

    python zero_shot_consumer.py hf|onnx DIR INPUTS OUT

INPUTS holds the held-out images (NNNN.* in the order to classify), labels.json,
classnames.json and templates.json. Prints {"top1": ..., "predictions": [...]} as JSON
and writes OUT/image_embeds.npy and OUT/classes.npy (the unit vectors it compared).

The classifier is CLIP's prompt ensemble, as megabatch's evaluation builds it: each
class's prompts (templates filled with its name) embedded, each embedding normalised,
their mean normalised again; an image's class is the one whose vector has the largest
dot product with the image's normalised embedding.
"""

import json
import sys
from pathlib import Path

from blocked_imports import block

block("megabatch")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hf_embedders(folder: Path):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)

    def images(batch):
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return model.get_image_features(pixel_values=pixels).pooler_output.numpy()

    def texts(prompts):
        tokens = processor(text=prompts, padding="max_length", truncation=True,
                           return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            return model.get_text_features(**tokens).pooler_output.numpy()

    return images, texts


def _onnx_embedders(folder: Path):
    import onnxruntime as ort
    from transformers import AutoTokenizer, CLIPImageProcessor

    image_session = ort.InferenceSession(str(folder / "image_encoder" / "model.onnx"),
                                         providers=["CPUExecutionProvider"])  # fmt: skip
    text_session = ort.InferenceSession(str(folder / "text_encoder" / "model.onnx"),
                                        providers=["CPUExecutionProvider"])  # fmt: skip
    processor = CLIPImageProcessor.from_pretrained(folder / "image_encoder")
    tokenizer = AutoTokenizer.from_pretrained(folder / "text_encoder")

    def images(batch):
        pixels = processor(images=batch, return_tensors="np")["pixel_values"]
        return image_session.run(["image_embeds"], {"pixel_values": pixels})[0]

    def texts(prompts):
        tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="np")
        feeds = {"input_ids": tokens["input_ids"].astype(np.int64),
                 "attention_mask": tokens["attention_mask"].astype(np.int64)}  # fmt: skip
        return text_session.run(["text_embeds"], feeds)[0]

    return images, texts


def main(backend: str, folder: Path, inputs: Path, out: Path) -> None:
    embed_images, embed_texts = {"hf": _hf_embedders, "onnx": _onnx_embedders}[backend](folder)
    classnames = json.loads((inputs / "classnames.json").read_text())
    templates = json.loads((inputs / "templates.json").read_text())
    classes = np.stack([_unit(_unit(embed_texts([t.format(name) for t in templates])).mean(0))
                        for name in classnames])  # fmt: skip
    paths = sorted(p for p in inputs.iterdir() if p.suffix in (".jpg", ".png"))
    image_embeds = np.concatenate([embed_images([Image.open(p) for p in paths[i : i + 64]])
                                   for i in range(0, len(paths), 64)])  # fmt: skip
    predictions = (_unit(image_embeds) @ classes.T).argmax(axis=1)
    np.save(out / "image_embeds.npy", _unit(image_embeds))
    np.save(out / "classes.npy", classes)
    labels = np.array(json.loads((inputs / "labels.json").read_text()))
    print(json.dumps({"top1": float((predictions == labels).mean()),
                      "predictions": predictions.tolist()}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
