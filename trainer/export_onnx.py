"""The exported towers as ONNX files (``megabatch export --format onnx``), each checked
with onnxruntime against PyTorch on held-out samples before the export counts as done.

One file per tower; the batch axis is dynamic (named ``batch``), the image side S and
the context length L are fixed:

- CLIP: ``image_encoder/model.onnx``: ``pixel_values`` float32 (batch, 3, S, S) ->
  ``image_embeds`` float32 (batch, D), L2-normalised; ``text_encoder/model.onnx``:
  ``input_ids`` and ``attention_mask`` int64 (batch, L) -> ``text_embeds`` float32
  (batch, D), L2-normalised. The trainer's ``encode_image`` / ``encode_text``.
- SimCLR: ``model.onnx``: ``pixel_values`` -> ``features`` float32 (batch, F), not
  normalised: what the linear probe reads (``SimCLRModel.features``).

The modules exported are thin wrappers (below) around the transformers towers that
export_hf builds from the checkpoint, so ONNX and ``--format hf`` hold the same
weights. Each file's ``doc_string`` and ``metadata_props`` describe its inputs and
outputs and the run (``tower_metadata``). Files stay single (weights inside) below
``EXTERNAL_DATA_BYTES``; above it the weights go to ``model.onnx.data`` beside the file,
as protobuf cannot hold a message of 2 GiB.

The check (``check_file``): up to ``CHECK_SAMPLES`` held-out samples, read by
megabatch's loader as evaluation reads them (``held_out_samples``), go through
onnxruntime at two batch sizes (1 and all of them: the dynamic axis) and through the
PyTorch module; the largest difference must be at most ``TOLERANCE`` times the
largest output magnitude, at least 1 (absolute on unit embeddings, relative on
SimCLR's features). Otherwise OnnxExportError, and the export writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.read.loader import ShardLoader
from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.data_pipeline.read.transforms import device_preprocess
from megabatch.trainer import __version__
from megabatch.trainer.config import RunConfig
from megabatch.trainer.console import first_line
from megabatch.trainer.data import image_config, loader_config

ONNX_FILE = "model.onnx"
# fp32, onnxruntime against PyTorch, on the same inputs: max |difference| <= TOLERANCE *
# max(1, max |PyTorch output|). onnxruntime fuses and reorders float32 ops (attention,
# layer norm, GELU, conv + batch norm), so a few 1e-7 on unit vectors is expected
# (measured 1.2e-7 on CLIP's embeddings, 1.2e-6 relative on SimCLR's features, up to
# ViT-B/16 and ResNet-50: docs/export.md "ONNX"); 1e-4 leaves a margin of 80x and more
# and still catches a wrong op, input or weight (those move unit vectors by 1e-2 and more).
TOLERANCE = 1e-4
# Held-out samples the check runs (one loader batch of this size, fewer if the split
# has fewer).
CHECK_SAMPLES = 64
# Weights above this go to external data (model.onnx.data): torch.onnx's own threshold,
# which keeps the file under protobuf's 2 GiB with room for the graph.
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB

# What each input and output is, for the files' doc strings and metadata. {S}: image
# side, {L}: context length, {D}: output width.
_DESCRIBED = {
    "pixel_values": "float32 (batch, 3, {S}, {S}): RGB, the centred square resized to {S}, "
    "scaled to [0, 1], normalised with the image_mean and image_std of the metadata "
    "(preprocessor_config.json, CLIPImageProcessor, does this)",
    "input_ids": "int64 (batch, {L}): token ids, <|startoftext|> ... <|endoftext|> padded "
    'with <pad> to {L} (the tokenizer, padding="max_length", truncation=True)',
    "attention_mask": "int64 (batch, {L}): 1 for tokens, 0 for padding (the tokenizer's)",
    "image_embeds": "float32 (batch, {D}): the image embedding, L2-normalised",
    "text_embeds": "float32 (batch, {D}): the caption embedding, L2-normalised",
    "features": "float32 (batch, {D}): the backbone's features (what the linear probe "
    "reads), not normalised",
}


class OnnxExportError(ValueError):
    """A tower that does not export, differs from PyTorch, or has nothing to be checked
    against: one line."""


# --------------------------------------------------------------------------- the modules
class ImageEmbeds(nn.Module):
    """``CLIPVisionModelWithProjection``: pixel_values (B, 3, S, S) -> (B, D) unit."""

    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision(pixel_values=pixel_values).image_embeds, dim=-1)


class TextEmbeds(nn.Module):
    """``CLIPTextModelWithProjection``: input_ids, attention_mask (B, L) -> (B, D) unit."""

    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(out.text_embeds, dim=-1)


class SimCLRFeatures(nn.Module):
    """The SimCLR backbone: pixel_values (B, 3, S, S) -> (B, F), as
    ``SimCLRModel.features``: ResNet's pooled output (B, F, 1, 1) flattened, ViT's
    [CLS] state."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.is_resnet = encoder.config.model_type == "resnet"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.encoder(pixel_values=pixel_values)
        if self.is_resnet:
            return out.pooler_output.flatten(1)
        return out.last_hidden_state[:, 0]


@dataclass(frozen=True)
class OnnxTower:
    """One ONNX file: ``module`` maps the named inputs to the named output."""

    path: str  # relative to DIR, with /
    name: str  # "image", "text", "backbone": metadata and error messages
    module: nn.Module
    inputs: tuple[str, ...]
    output: str
    normalised: bool


def clip_onnx_towers(vision: nn.Module, text: nn.Module) -> list[OnnxTower]:
    """From export_hf.clip_towers."""
    return [
        OnnxTower(f"image_encoder/{ONNX_FILE}", "image", ImageEmbeds(vision).eval(),
                  ("pixel_values",), "image_embeds", normalised=True),
        OnnxTower(f"text_encoder/{ONNX_FILE}", "text", TextEmbeds(text).eval(),
                  ("input_ids", "attention_mask"), "text_embeds", normalised=True),
    ]  # fmt: skip


def simclr_onnx_towers(encoder: nn.Module) -> list[OnnxTower]:
    """From export_hf.simclr_encoder."""
    return [OnnxTower(ONNX_FILE, "backbone", SimCLRFeatures(encoder).eval(), ("pixel_values",),
                      "features", normalised=False)]  # fmt: skip


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class HeldOutSamples:
    """The trainer's evaluation inputs of a few samples; N >= 2."""

    split: str  # "data.val" or "data.train"
    pixel_values: torch.Tensor  # (N, 3, S, S) float32, normalised
    input_ids: torch.Tensor | None  # (N, L) int64; CLIP only
    attention_mask: torch.Tensor | None  # (N, L) int64; CLIP only

    def __len__(self) -> int:
        return len(self.pixel_values)

    def inputs(self, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in names)


def held_out_samples(config: RunConfig, tokenizer: CaptionTokenizer | None) -> HeldOutSamples:
    """Up to CHECK_SAMPLES samples of ``data.val`` (else ``data.train``), read as
    evaluation reads them (trainer/eval_run.py). OnnxExportError when neither reads."""
    why = []
    for key in ("data.val", "data.train"):
        spec = getattr(config.data, key.split(".")[1])
        if spec is None:
            why.append(f"{key} is not set")
            continue
        try:
            return _first_batch(config, key, spec, tokenizer)
        except (DataError, OSError) as exc:
            why.append(f"{key}: {first_line(exc)}")
    raise OnnxExportError("--format onnx checks the ONNX files against PyTorch on held-out "
                          f"samples and none can be read ({'; '.join(why)}); "
                          "--format hf needs no shards")  # fmt: skip


def _first_batch(config: RunConfig, key: str, spec, tokenizer) -> HeldOutSamples:
    captions = tokenizer is not None
    loader_cfg = loader_config(config, spec, captions=captions, evaluation=True)
    loader = ShardLoader(replace(loader_cfg, batch_size=CHECK_SAMPLES), tokenizer=tokenizer)
    batches = iter(loader)
    quiet_data = logging.getLogger("megabatch.data")  # skipped samples: the error says why
    level = quiet_data.level
    quiet_data.setLevel(logging.ERROR)
    try:
        batch = next(batches)
    except StopIteration:
        raise DataError("no samples") from None
    finally:
        batches.close()
        quiet_data.setLevel(level)
    rows = [0, 0] if len(batch) == 1 else slice(None)  # one sample: twice, for 2 sizes
    pixels = device_preprocess(batch.images, image_config(config))[rows].contiguous()
    if not captions:
        return HeldOutSamples(key, pixels, None, None)
    return HeldOutSamples(key, pixels, batch.tokens[rows].clone(),
                          batch.token_mask[rows].long())  # fmt: skip


def short_number(x: float) -> str:
    """1e-4 rather than 0.0001 or 1e-04."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+00", "")


# --------------------------------------------------------------------------- metadata
def run_metadata(config: RunConfig, step: int, logit_scale: float | None,
                 logit_bias: float | None = None) -> dict[str, str]:  # fmt: skip
    """What every file of the export carries: the run and its preprocessing."""
    image = image_config(config)
    meta = {
        "task": config.task, "preset": config.model.preset,
        "image_size": str(config.model.image_size),
        "image_mean": ",".join(f"{v:.8g}" for v in image.mean),
        "image_std": ",".join(f"{v:.8g}" for v in image.std),
        "megabatch_version": __version__, "step": str(step),
    }  # fmt: skip
    if config.task == "clip":
        meta["context_length"] = str(config.model.context_length)
        # exp(t), clamped as trained: zero-shot logits = logit_scale * image . text
        meta["logit_scale"] = f"{logit_scale:.9g}"
    if logit_bias is not None:  # SigLIP: p(match) = sigmoid(logit_scale * dot + logit_bias)
        meta["logit_bias"] = f"{logit_bias:.9g}"
    return meta


def tower_metadata(tower: OnnxTower, run: dict[str, str], width: int) -> dict[str, str]:
    sizes = {"S": run["image_size"], "L": run.get("context_length", "?"), "D": str(width)}
    return {
        **run, "tower": tower.name, "embedding_dim": str(width),
        "normalised": "yes" if tower.normalised else "no",
        "inputs": "; ".join(f"{n}: {_DESCRIBED[n].format(**sizes)}" for n in tower.inputs),
        "outputs": f"{tower.output}: {_DESCRIBED[tower.output].format(**sizes)}",
    }  # fmt: skip


def _doc_string(meta: dict[str, str]) -> str:
    scale = (f" Zero-shot logits: logit_scale ({meta['logit_scale']}) times the dot product "
             "of image and text embeddings." if "logit_scale" in meta else "")  # fmt: skip
    return (f"megabatch {meta['task']} {meta['preset']}, {meta['tower']} tower, step "
            f"{meta['step']}. Inputs: {meta['inputs']}. Output: {meta['outputs']}."
            + scale)  # fmt: skip


# --------------------------------------------------------------------------- writing
def write_onnx(folder: Path, towers: list[OnnxTower], samples: HeldOutSamples,
               run: dict[str, str]) -> dict[str, dict]:  # fmt: skip
    """Each tower's file under ``folder``, checked; returns the check's numbers per file
    (for the manifest). OnnxExportError on a tower that fails either."""
    checks = {}
    for tower in towers:
        path = folder / tower.path
        path.parent.mkdir(parents=True, exist_ok=True)
        example = tuple(t[:2] for t in samples.inputs(tower.inputs))  # batch 2: not specialised
        program = _export(tower, example)
        width = program.model.graph.outputs[0].shape[1]
        _annotate(program.model, tower, tower_metadata(tower, run, int(width)))
        with _quiet():
            program.save(path, external_data=_weight_bytes(tower.module) > EXTERNAL_DATA_BYTES)
        checks[tower.path] = check_file(path, tower, samples)
    return checks


def _export(tower: OnnxTower, example: tuple[torch.Tensor, ...]):
    """torch.onnx (the dynamo exporter) -> an ONNXProgram, the batch axis dynamic."""
    batch = torch.export.Dim("batch")
    try:
        with _quiet(), torch.no_grad():
            return torch.onnx.export(
                tower.module, example, input_names=list(tower.inputs),
                output_names=[tower.output], dynamic_shapes=tuple({0: batch} for _ in example),
                dynamo=True, verbose=False,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - torch.export and torch.onnx raise many types
        raise OnnxExportError(f"the {tower.name} tower does not export to ONNX: "
                              f"{type(exc).__name__}: {first_line(exc)}") from None  # fmt: skip


def _annotate(model, tower: OnnxTower, meta: dict[str, str]) -> None:
    """The file's doc_string and metadata_props, and a doc_string on each input and
    output (onnx_ir objects)."""
    model.doc_string = _doc_string(meta)
    model.metadata_props.update(meta)
    sizes = {"S": meta["image_size"], "L": meta.get("context_length", "?"),
             "D": meta["embedding_dim"]}  # fmt: skip
    for value in [*model.graph.inputs, *model.graph.outputs]:
        value.doc_string = _DESCRIBED[value.name].format(**sizes)


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@contextlib.contextmanager
def _quiet():
    """torch.onnx's progress lines (stdout), its logging and warnings (stderr) held
    back: the command prints DIR or one error line."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # fmt: skip
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------- the check
def check_file(path: Path, tower: OnnxTower, samples: HeldOutSamples) -> dict:
    """onnxruntime on the written file against the PyTorch module, on the same held-out
    inputs, at batch sizes 1 and N. OnnxExportError beyond the tolerance."""
    inputs = samples.inputs(tower.inputs)
    with torch.no_grad():
        expected = tower.module(*inputs).numpy()  # (N, D)
    session, n, worst = _session(path, tower), len(samples), 0.0
    for size in (1, n):
        got = _run(session, tower, {name: t[:size].numpy() for name, t in
                                    zip(tower.inputs, inputs, strict=True)})  # fmt: skip
        if got.shape != expected[:size].shape:
            raise OnnxExportError(f"{tower.path}: onnxruntime gave shape {got.shape} for "
                                  f"batch {size}, PyTorch {expected[:size].shape}")  # fmt: skip
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected[:size]).max()))
    scale = max(1.0, float(np.abs(expected).max()))
    if not worst <= TOLERANCE * scale:  # NaN fails too
        raise OnnxExportError(
            f"{tower.path}: onnxruntime differs from PyTorch by {worst:.3g} on {n} held-out "
            f"samples ({samples.split}), more than the tolerance {short_number(TOLERANCE)}"
            + (f" x {scale:.3g} (the largest output)" if scale > 1 else "")
        )
    return {"max_abs_diff": worst, "tolerance": TOLERANCE * scale, "samples": n,
            "batch_sizes": [1, n], "shards": samples.split}  # fmt: skip


def _session(path: Path, tower: OnnxTower):
    """onnxruntime (CPU) on the file as written. OnnxExportError when it cannot load it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: nothing on stderr
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise OnnxExportError(f"{tower.path}: onnxruntime cannot load it: "
                              f"{first_line(exc)}") from None  # fmt: skip


def _run(session, tower: OnnxTower, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The tower's output, (batch, D). OnnxExportError when onnxruntime cannot run it."""
    try:
        return session.run([tower.output], feed)[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise OnnxExportError(f"{tower.path}: onnxruntime cannot run it: "
                              f"{first_line(exc)}") from None  # fmt: skip
