"""The export folder as ``megabatch embed`` runs it: its own processor and tokenizer, and
its model through transformers or onnxruntime, nothing of megabatch's models (the
command is how a downstream team first proves that the export stands alone).

- CLIP: images through ``image_encoder/`` (``CLIPVisionModelWithProjection`` or
  ``model.onnx``, with its ``preprocessor_config.json``), captions through
  ``text_encoder/`` (``CLIPTextModelWithProjection`` or ``model.onnx``, with the
  tokenizer files); embeddings L2-normalised, as ``CLIPModel`` gives them.
- SimCLR: the backbone at the folder's top (``ResNetModel`` / ``ViTModel`` or
  ``model.onnx``); features as the linear probe reads them, not normalised.

The image processor is loaded with its PIL backend (docs/export.md, "Preprocessing"):
what the export's tolerances were measured with, whatever else is installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megabatch.trainer.config import task_names
from megabatch.trainer.console import first_line
from megabatch.trainer.embed_sources import EmbedError

IMAGE_ENCODER, TEXT_ENCODER = "image_encoder", "text_encoder"  # as export_hf writes them
ONNX_FILE = "model.onnx"
SIMCLR_TYPES = ("resnet", "vit")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ONNX_INPUTS = {"image_embeds": ("pixel_values",), "features": ("pixel_values",),
               "text_embeds": ("input_ids", "attention_mask")}  # fmt: skip


@dataclass(frozen=True)
class Export:
    folder: Path
    task: str  # "clip", or an image-only method's (simclr, moco, byol, ...): a backbone
    model_type: str  # config.json's: "clip", "resnet" or "vit"; "TASK (ONNX only)" without
    step: int | None  # manifest.json's, when there is one

    def tower(self, column: str) -> Path:
        """The folder that makes ``column``: model, processor or tokenizer, ONNX file."""
        if self.task != "clip":
            return self.folder
        return self.folder / (IMAGE_ENCODER if column == "image_embeds" else TEXT_ENCODER)


def read_export(folder: Path) -> Export:
    """What ``folder`` holds: the task from manifest.json (``megabatch export``'s), the
    model type from config.json (absent from an ONNX-only export); an EmbedError unless
    it is a CLIP model or a ResNet/ViT backbone."""
    manifest, config = _json_object(folder / "manifest.json"), _json_object(folder / "config.json")
    if manifest is None and config is None:
        raise EmbedError(f"{folder} is not an export folder (no config.json or manifest.json; "
                         "see megabatch export)")  # fmt: skip
    model_type = (config or {}).get("model_type")
    if config is not None and model_type != "clip" and model_type not in SIMCLR_TYPES:
        raise EmbedError(f"{folder} holds a {model_type!r} model, not an export of megabatch "
                         "(a clip model, or a resnet or vit backbone)")  # fmt: skip
    task = (manifest or {}).get("task") or ("clip" if model_type == "clip" else "simclr")
    if task not in task_names():
        raise EmbedError(f"{folder / 'manifest.json'} names task {task!r}, not one of "
                         f"{', '.join(task_names())}")  # fmt: skip
    step = (manifest or {}).get("step")
    return Export(folder, task, model_type or f"{task} (ONNX only)", step)


def _json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when there is no such file; an EmbedError when
    it is not a JSON object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise EmbedError(f"{path} is not a readable JSON object") from None
    if not isinstance(value, dict):
        raise EmbedError(f"{path} is not a JSON object")
    return value


def columns_for(export: Export, images: bool, captions: bool) -> tuple[str, ...]:
    if export.task != "clip":  # an image-only method's backbone
        return ("features",)
    return ("image_embeds",) * images + ("text_embeds",) * captions


def check_files(export: Export, columns: tuple[str, ...], onnx: bool) -> None:
    """An EmbedError naming the first file that making ``columns`` needs and that
    ``export`` lacks: the model (config.json and weights, or model.onnx), the processor
    or tokenizer."""
    for column in columns:
        tower = export.tower(column)
        inputs = TOKENIZER_FILES if column == "text_embeds" else ("preprocessor_config.json",)
        if onnx and not (tower / ONNX_FILE).is_file():
            raise EmbedError(f"{tower / ONNX_FILE} is missing: export with --format onnx "
                             "(megabatch export RUN --format hf,onnx) to embed with --onnx")  # fmt: skip
        if not onnx and not (tower / "config.json").is_file() and (tower / ONNX_FILE).is_file():
            raise EmbedError(f"{tower} holds no transformers model (exported with --format "
                             "onnx): pass --onnx")  # fmt: skip
        model = () if onnx else ("config.json", "model.safetensors")
        for name in (*model, *inputs):
            if not (tower / name).is_file():
                raise EmbedError(f"{tower / name} is missing: {export.folder} is not a "
                                 "complete export (see megabatch export)")  # fmt: skip


class Encoder:
    """``encode(column, inputs)``: (B, D) float32 for a list of B PIL images
    (image_embeds, features) or B captions (text_embeds)."""

    backend: str
    device: str

    def __init__(self, export: Export, columns: tuple[str, ...]):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.export, self.columns = export, columns
        self.processors = {}
        for column in columns:
            folder = export.tower(column)
            self.processors[column] = (
                AutoTokenizer.from_pretrained(folder) if column == "text_embeds"
                else AutoImageProcessor.from_pretrained(folder, backend="pil")
            )  # fmt: skip

    def model_inputs(self, column: str, inputs: list) -> dict[str, np.ndarray]:
        """pixel_values (B, 3, S, S) float32, or input_ids and attention_mask (B, L)
        int64, L the context length: the trainer's ids and mask (docs/export.md)."""
        processor = self.processors[column]
        if column == "text_embeds":
            out = processor(inputs, padding="max_length", truncation=True, return_tensors="np")
            return {k: out[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        return {"pixel_values": processor(images=inputs, return_tensors="np")["pixel_values"]}

    def encode(self, column: str, inputs: list) -> np.ndarray:
        raise NotImplementedError


class TransformersEncoder(Encoder):
    backend = "transformers"

    def __init__(self, export: Export, columns: tuple[str, ...]):
        import torch
        from transformers import (
            AutoModel,
            CLIPTextModelWithProjection,
            CLIPVisionModelWithProjection,
        )

        super().__init__(export, columns)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        classes = {"image_embeds": CLIPVisionModelWithProjection,
                   "text_embeds": CLIPTextModelWithProjection, "features": AutoModel}  # fmt: skip
        self.models = {
            c: classes[c].from_pretrained(export.tower(c), dtype=torch.float32).to(self.device).eval()
            for c in columns
        }  # fmt: skip

    def encode(self, column: str, inputs: list) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        feeds = {k: torch.from_numpy(v).to(self.device)
                 for k, v in self.model_inputs(column, inputs).items()}  # fmt: skip
        with torch.inference_mode():
            out = self.models[column](**feeds)
            if column == "features":  # what the linear probe reads
                vectors = (out.last_hidden_state[:, 0] if self.export.model_type == "vit"
                           else out.pooler_output.flatten(1))  # fmt: skip
            else:  # the towers' projections are not normalised; CLIPModel's are
                vectors = F.normalize(getattr(out, column), dim=-1)
        return vectors.float().cpu().numpy()


class OnnxEncoder(Encoder):
    """The export's ONNX files (``--format onnx``): inputs pixel_values, or input_ids and
    attention_mask; one output named as the column, already normalised for CLIP."""

    backend = "onnxruntime"

    def __init__(self, export: Export, columns: tuple[str, ...]):
        import onnxruntime as ort

        super().__init__(export, columns)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]  # fmt: skip
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the command's stderr is its own
        self.sessions = {}
        for column in columns:
            path = export.tower(column) / ONNX_FILE
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # onnxruntime raises its own kinds for a bad file
                raise EmbedError(
                    f"{path}: onnxruntime cannot load it ({first_line(exc)})"
                ) from None
            _check_names(path, "inputs", session.get_inputs(), ONNX_INPUTS[column])
            _check_names(path, "outputs", session.get_outputs(), (column,))
            self.sessions[column] = session

    def encode(self, column: str, inputs: list) -> np.ndarray:
        feeds = self.model_inputs(column, inputs)
        (vectors,) = self.sessions[column].run([column], feeds)
        return np.asarray(vectors, dtype=np.float32)


def _check_names(path: Path, what: str, args, expected: tuple[str, ...]) -> None:
    """The export's ONNX contract (docs/export.md): these input and output names."""
    names = [arg.name for arg in args]
    if not set(expected) <= set(names):
        raise EmbedError(f"{path}: {what} {', '.join(names)}, expected {', '.join(expected)} "
                         "(not an ONNX file of megabatch export?)")  # fmt: skip


def load_encoder(export: Export, columns: tuple[str, ...], onnx: bool) -> Encoder:
    """The encoder of ``columns``; an EmbedError when the folder's files do not load."""
    try:
        return (OnnxEncoder if onnx else TransformersEncoder)(export, columns)
    except EmbedError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # transformers' for a broken file
        raise EmbedError(f"{export.folder}: cannot load it ({first_line(exc)})") from None
