"""``megabatch export RUN``: a run's checkpoint as a folder that downstream teams load
with transformers or onnxruntime alone (docs/export.md).

Reads RUN/config.yaml and one complete checkpoint (the newest whose loss was finite, or
``--checkpoint PATH``); the weights come from ``checkpoint.model_weights`` (weights-only
loads: no code unpickled): rank 0's module file, which holds every parameter under ZeRO
1 and 2, with the float32 master weights for bf16/fp16 runs (gathered from the ranks'
optimizer partitions under ZeRO 1-2). Stage 3, which would partition the parameters, is
refused.

The folder is built under ``.DIR.partial-PID`` beside DIR and renamed into place when
every file is written (``atomic_folder``): an export cut short (an error, Ctrl-C,
SIGTERM) removes its partial folder, and one killed outright leaves only the hidden
partial folder, which the next export to the same DIR removes. DIR is never half
written. Files: export_hf's (transformers' own: JSON and safetensors; the tokenizer and
image processor for every format), export_onnx's (one .onnx file per tower, each
checked with onnxruntime before the folder is renamed into place), the model card
README.md (``write_model_card``) and manifest.json, the sha256 of every other file
(``write_manifest``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megabatch.trainer.atomic_write import PathExists, atomic_folder
from megabatch.trainer.checkpoint import MODEL_STATES, Checkpoint, CheckpointError, read_checkpoint
from megabatch.trainer.config import ConfigError, RunConfig, load_config
from megabatch.trainer.console import first_line, quiet_libraries
from megabatch.trainer.resume import config_changes, latest_checkpoint, refused_changes
from megabatch.trainer.stop_signals import sigterm_raises

FORMATS = ("hf", "onnx")
DEFAULT_FORMATS = "hf,onnx"
MANIFEST, CARD = "manifest.json", "README.md"


class ExportError(ValueError):
    """Bad input to the export (run, checkpoint, format, DIR): one line."""


@dataclass(frozen=True)
class ExportPlan:
    run_dir: Path
    config: RunConfig
    checkpoint: Checkpoint
    out: Path
    formats: tuple[str, ...]
    overwrite: bool


# --------------------------------------------------------------------------- the command
def add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a run's checkpoint as a Hugging Face (transformers) and ONNX model folder",
        description="Write RUN's newest complete checkpoint (or --checkpoint PATH) as a "
        "folder that transformers and onnxruntime load with nothing of megabatch. hf: CLIP "
        "as CLIPModel + CLIPProcessor (tokenizer, image processor) with image_encoder/ and "
        "text_encoder/ (CLIPVisionModelWithProjection, CLIPTextModelWithProjection); SimCLR "
        "as its backbone without the projection head (AutoModel) + image processor. onnx: "
        "image_encoder/model.onnx (pixel_values -> image_embeds) and "
        "text_encoder/model.onnx (input_ids, attention_mask -> text_embeds), unit vectors; "
        "SimCLR's model.onnx (pixel_values -> features); the batch axis dynamic; each "
        "checked against PyTorch with onnxruntime on held-out samples (the export fails, "
        "writing nothing, beyond the tolerance). Adds a model card (README.md) and "
        "manifest.json (sha256 of every file). Safetensors, ONNX and JSON only; written "
        "under a temporary name and renamed when complete. See docs/export.md. Exit "
        "status: 0 written, 2 bad input.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN")
    export.add_argument("--checkpoint", default="latest", metavar="latest|PATH",
                        help="latest (default): the newest complete checkpoint whose loss "
                        "was finite; or a checkpoint directory RUN/checkpoints/stepNNNNNNNN")  # fmt: skip
    export.add_argument("--out", type=Path, metavar="DIR",
                        help="the folder to write (default RUN/export/stepNNNNNNNN)")  # fmt: skip
    export.add_argument("--format", default=DEFAULT_FORMATS, metavar="FORMATS",
                        help="comma-separated formats: hf (transformers: safetensors and "
                        "JSON), onnx (one .onnx file per tower, checked against PyTorch "
                        "with onnxruntime on held-out samples, so it needs readable "
                        f"data.val or data.train shards); default {DEFAULT_FORMATS}")  # fmt: skip
    export.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it exists (else an existing DIR is refused)")  # fmt: skip
    export.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        plan = plan_export(args.run_dir, args.checkpoint, args.out, args.format, args.overwrite)
        with sigterm_raises():
            out = export(plan)
    except (ExportError, ConfigError, CheckpointError) as exc:
        print(f"megabatch export: error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(out)
    return 0


# --------------------------------------------------------------------------- the plan
def parse_formats(text: str) -> tuple[str, ...]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ExportError(f"--format is empty (use {DEFAULT_FORMATS}, hf or onnx)")
    for name in names:
        if name not in FORMATS:
            raise ExportError(f"unknown --format {name!r} (choose from {', '.join(FORMATS)})")
    return tuple(dict.fromkeys(names))


def plan_export(run_dir: Path, checkpoint: str = "latest", out: Path | None = None,
                formats: str = DEFAULT_FORMATS, overwrite: bool = False) -> ExportPlan:  # fmt: skip
    """Every check that needs no weights read: format, run, checkpoint, DIR."""
    chosen = parse_formats(formats)
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml", [f"run_dir={run_dir}"])
    if checkpoint == "latest":
        chosen_checkpoint = latest_checkpoint(run_dir)
        if chosen_checkpoint is None:
            raise ExportError(f"no complete checkpoint to export in {run_dir / 'checkpoints'}")
    else:
        chosen_checkpoint = read_checkpoint(Path(checkpoint))
    other_model = refused_changes(config_changes(chosen_checkpoint, config), for_eval=True)
    if other_model:
        raise ExportError(f"{chosen_checkpoint.path} holds another model than the run's config: "
                          + "; ".join(map(str, other_model)))  # fmt: skip
    if config.engine.zero_stage == 3:  # never trained (config.validate), said all the same
        raise ExportError("ZeRO stage 3 checkpoints are not supported (parameters partitioned)")
    if not (chosen_checkpoint.path / "state" / MODEL_STATES).is_file():
        raise ExportError(f"cannot read {chosen_checkpoint.path}: no state/{MODEL_STATES}")
    out = Path(out) if out is not None else run_dir / "export" / chosen_checkpoint.path.name
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    return ExportPlan(run_dir, config, chosen_checkpoint, out, chosen, overwrite)


# --------------------------------------------------------------------------- writing
def export(plan: ExportPlan) -> Path:
    """Write plan.out (atomically); returns it. Everything that can fail before a file
    is written (the weights, the held-out samples ONNX is checked on) is read first."""
    from megabatch.trainer import export_onnx
    from megabatch.trainer.checkpoint import model_weights

    quiet_libraries()
    module = model_weights(plan.checkpoint)
    parts = _clip_parts(plan, module) if plan.config.task == "clip" else _simclr_parts(plan, module)
    onnx = "onnx" in plan.formats
    try:
        samples = export_onnx.held_out_samples(plan.config, parts.tokenizer) if onnx else None
        with atomic_folder(plan.out, plan.overwrite) as folder:
            parts.write_processors(folder)
            if "hf" in plan.formats:
                parts.write_weights(folder)
            checks = {}
            if onnx:
                run = export_onnx.run_metadata(plan.config, plan.checkpoint.step, parts.logit_scale,
                                               parts.logit_bias)  # fmt: skip
                checks = export_onnx.write_onnx(folder, parts.onnx_towers(), samples, run)
            write_model_card(folder / CARD, plan)
            write_manifest(folder, plan, checks)
    except PathExists as exc:  # DIR appeared while we wrote
        raise ExportError(str(exc)) from None
    except export_onnx.OnnxExportError as exc:  # the partial folder is gone by now
        raise ExportError(str(exc)) from None
    return plan.out


@dataclass(frozen=True)
class _Parts:
    """One task's pieces of the export, built from the weights before DIR is touched."""

    write_processors: Callable[[Path], None]  # tokenizer, image processor: every format
    write_weights: Callable[[Path], None]  # transformers' configs and safetensors: hf
    onnx_towers: Callable[[], list]  # export_onnx.OnnxTower list: onnx
    tokenizer: Any  # the run's CaptionTokenizer (CLIP), None (SimCLR)
    logit_scale: float | None  # exp(t) as trained, clamped (CLIP)
    logit_bias: float | None = None  # b as trained (CLIP trained with SigLIP's loss)


def _clip_parts(plan: ExportPlan, module: dict) -> _Parts:
    from megabatch.trainer import export_hf, export_onnx
    from megabatch.trainer.data import image_config

    config = plan.config
    tokenizer = _tokenizer(config)
    try:
        model = export_hf.clip_model(_clip_config(config, tokenizer), module,
                                     config.loss.max_logit_scale)  # fmt: skip
    except export_hf.WeightsMismatch as exc:
        raise ExportError(f"{plan.checkpoint.path}: {exc}") from None
    hf_tokenizer = export_hf.clip_tokenizer(tokenizer)
    processor = export_hf.image_processor(image_config(config))
    return _Parts(
        write_processors=lambda folder: export_hf.write_clip_processors(folder, hf_tokenizer,
                                                                        processor),
        write_weights=lambda folder: export_hf.write_clip_model(folder, model),
        onnx_towers=lambda: export_onnx.clip_onnx_towers(*export_hf.clip_towers(model)),
        tokenizer=tokenizer, logit_scale=model.logit_scale.detach().exp().item(),
        logit_bias=getattr(model.config, "logit_bias", None),
    )  # fmt: skip


def _simclr_parts(plan: ExportPlan, module: dict) -> _Parts:
    from megabatch.trainer import export_hf, export_onnx
    from megabatch.trainer.data import image_config

    m = plan.config.model
    try:
        encoder = export_hf.simclr_encoder(m.preset, m.image_size, module)
    except export_hf.WeightsMismatch as exc:
        raise ExportError(f"{plan.checkpoint.path}: {exc}") from None
    processor = export_hf.image_processor(image_config(plan.config))
    return _Parts(
        write_processors=lambda folder: export_hf.write_simclr_processor(folder, processor),
        write_weights=lambda folder: export_hf.write_simclr_model(folder, encoder),
        onnx_towers=lambda: export_onnx.simclr_onnx_towers(encoder),
        tokenizer=None, logit_scale=None,
    )  # fmt: skip


def _tokenizer(config: RunConfig):
    from megabatch.trainer.data import load_tokenizer

    return load_tokenizer(config)


def _clip_config(config: RunConfig, tokenizer):
    from megabatch.trainer.losses import initial_loss_params
    from megabatch.trainer.models.clip import clip_config

    m = config.model
    return clip_config(
        m.preset, image_size=m.image_size, context_length=m.context_length,
        vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, sot_id=tokenizer.sot_id,
        eot_id=tokenizer.eot_id, embed_dim=m.embed_dim,
        init_logit_scale=initial_loss_params(config)["logit_scale"],
    )  # fmt: skip


# --------------------------------------------------------------------------- card, manifest
def write_manifest(folder: Path, plan: ExportPlan, onnx_checks: dict | None = None) -> None:
    """manifest.json: where the export came from and the sha256 and size of every other
    file under ``folder`` (paths relative, with /); with ONNX, what each file's check
    against PyTorch measured (export_onnx.check_file)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        files[rel] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    manifest = {
        "format": "megabatch-export/1", "formats": list(plan.formats),
        "task": plan.config.task, "run_dir": str(plan.run_dir),
        "checkpoint": str(plan.checkpoint.path), "step": plan.checkpoint.step,
        "files": files,
    }  # fmt: skip
    if onnx_checks:
        manifest["onnx_checks"] = onnx_checks
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def write_model_card(path: Path, plan: ExportPlan) -> None:
    """README.md: training data, steps, batch, evaluation, preprocessing, how to load."""
    from megabatch.trainer.data import image_config
    from megabatch.trainer.losses import initial_loss_params, loss_name
    from megabatch.trainer.tasks import TASKS

    config, ckpt = plan.config, plan.checkpoint
    world = ckpt.meta.get("world_size")
    batch = config.global_batch_size(world) if isinstance(world, int) else None
    results, results_note = _results(plan.run_dir, ckpt.step)
    clip = config.task == "clip"
    m, d = config.model, config.data
    image = image_config(config)
    mean, std = (", ".join(f"{v:.8g}" for v in values) for values in (image.mean, image.std))
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [megabatch, {config.task}, "
        + (  # in-batch negatives (the GradCache step's methods), or none
            "contrastive" if TASKS[config.task].step_kind == "gradcache" else "self-supervised"
        )
        + (", onnx]" if "onnx" in plan.formats else "]"),
        "---",
        "",
        f"# {config.task.upper()} {m.preset} ({plan.run_dir.name}, step {ckpt.step})",
        "",
        f"Exported by `megabatch export` from `{ckpt.path}`.",
        "",
        "## Training",
        "",
        f"- task: {config.task}; model preset {m.preset}, image size {m.image_size}"
        + (f", context length {m.context_length}" if clip else ""),
        f"- training shards: `{json.dumps(d.train)}`",
        f"- held-out shards: `{json.dumps(d.val)}`",
        f"- steps: {ckpt.step}; samples seen: {ckpt.meta.get('samples_seen', 'unknown')}",
        f"- global batch: {batch if batch is not None else 'unknown'} "
        f"({config.batch.micro_batch_size} per micro-batch x {config.batch.accumulation_steps} "
        f"accumulation steps x {world if world is not None else '?'} ranks)",
        f"- loss: {loss_name(config)}"
        + (
            " (SigLIP's pairwise sigmoid; its trained bias is `logit_bias` in config.json: "
            "a pair matches with probability sigmoid(logit_scale x cosine + logit_bias))"
            if "logit_bias" in initial_loss_params(config)
            else ""
        ),
        f"- engine: ZeRO stage {config.engine.zero_stage}, {config.engine.precision}; "
        + (
            "exported in float32"
            if config.engine.precision == "fp32"
            else "exported in float32: the optimizer's master weights"
        ),
        "",
        "## Evaluation",
        "",
    ]
    if results:
        lines += [results_note, "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in results.items()]  # fmt: skip
    else:
        lines.append(results_note)
    lines += [
        "",
        "## Preprocessing",
        "",
        f"Images: RGB, the centred square, resized to {m.image_size} x {m.image_size} "
        f"(antialiased bilinear), scaled to [0, 1], normalised with mean ({mean}) and std "
        f"({std}): `CLIPImageProcessor` in preprocessor_config.json does this.",
    ]
    if clip:
        lines += [
            "",
            f"Captions: byte-level BPE (lower-cased), `<|startoftext|> ... <|endoftext|>` "
            f"padded with `<pad>` to {m.context_length} tokens, truncated before the end "
            'token; call the tokenizer with `padding="max_length", truncation=True`. The '
            "text feature is the end token's final state, projected.",
        ]
    lines += ["", "## Loading", ""]
    if "hf" in plan.formats:
        lines += ["With transformers:", "", "```python", *_snippet(clip), "```", ""]
    if "onnx" in plan.formats:
        lines += _onnx_card(config)
    path.write_text("\n".join(lines), encoding="utf-8")


def _results(run_dir: Path, step: int) -> tuple[dict, str]:
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}, "No evaluation results (RUN/results.json) were found."
    if not isinstance(results, dict):
        return {}, "No evaluation results (RUN/results.json) were found."
    at = results.pop("step", None)
    if at == step:
        return results, f"From results.json, at this step ({step}), on the held-out shards:"
    return results, (f"From results.json, at step {at} (not the exported step {step}), on "
                     "the held-out shards:")  # fmt: skip


def _snippet(clip: bool) -> list[str]:
    if clip:
        return [
            "import torch",
            "from PIL import Image",
            "from transformers import CLIPModel, CLIPProcessor",
            "",
            'model = CLIPModel.from_pretrained("DIR").eval()',
            'processor = CLIPProcessor.from_pretrained("DIR")',
            'inputs = processor(text=["a photo of a dog"], images=[Image.open("dog.jpg")],',
            '                   padding="max_length", truncation=True, return_tensors="pt")',
            "with torch.no_grad():",
            "    out = model(**inputs)",
            "image_embeds, text_embeds = out.image_embeds, out.text_embeds  # unit vectors",
            '# One tower: CLIPVisionModelWithProjection.from_pretrained("DIR/image_encoder"),',
            '# CLIPTextModelWithProjection.from_pretrained("DIR/text_encoder") (.image_embeds /',
            "# .text_embeds, then normalise).",
        ]
    return [
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        'model = AutoModel.from_pretrained("DIR").eval()',
        'processor = AutoImageProcessor.from_pretrained("DIR")',
        'inputs = processor(images=[Image.open("photo.jpg")], return_tensors="pt")',
        "with torch.no_grad():",
        "    out = model(**inputs)",
        "features = out.pooler_output.flatten(1)  # ResNet; ViT: out.last_hidden_state[:, 0]",
    ]


def _onnx_card(config: RunConfig) -> list[str]:
    """The card's ONNX part: the files' inputs and outputs, the check, a snippet."""
    from megabatch.trainer.export_onnx import TOLERANCE, short_number

    m, width = config.model, _output_width(config)
    pixels = f"`pixel_values` float32 (batch, 3, {m.image_size}, {m.image_size})"
    tokens = f"int64 (batch, {m.context_length})"
    if config.task == "clip":
        rows = [f"| `image_encoder/model.onnx` | {pixels} | `image_embeds` float32 (batch, "
                f"{width}), L2-normalised |",
                f"| `text_encoder/model.onnx` | `input_ids` {tokens}, `attention_mask` {tokens} "
                f"| `text_embeds` float32 (batch, {width}), L2-normalised |"]  # fmt: skip
    else:
        rows = [f"| `model.onnx` | {pixels} | `features` float32 (batch, {width}), not "
                "normalised (what the linear probe reads) |"]  # fmt: skip
    return [
        "With onnxruntime (no torch needed; transformers only for the image processor and "
        "tokenizer):",
        "",
        "| file | inputs | output |",
        "|---|---|---|",
        *rows,
        "",
        "The batch axis is dynamic; the other sizes are fixed. Each file's metadata "
        "(`custom_metadata_map`) holds the run's preprocessing, the step"
        + (" and the trained logit scale" if config.task == "clip" else "")
        + ". Checked during the export against PyTorch on held-out samples (manifest.json, "
        f"`onnx_checks`): at most {short_number(TOLERANCE)} apart (float32; relative to "
        "the largest output where that exceeds 1).",
        "",
        "```python",
        *_onnx_snippet(config.task == "clip"),
        "```",
        "",
    ]


def _output_width(config: RunConfig) -> int:
    """D of the ONNX outputs: CLIP's embedding, SimCLR's backbone features."""
    from megabatch.trainer.models.clip import CLIP_PRESETS
    from megabatch.trainer.models.simclr import encoder_config

    m = config.model
    if config.task == "clip":
        return m.embed_dim or CLIP_PRESETS[m.preset].embed_dim
    encoder = encoder_config(m.preset, m.image_size)
    return encoder.hidden_sizes[-1] if encoder.model_type == "resnet" else encoder.hidden_size


def _onnx_snippet(clip: bool) -> list[str]:
    if clip:
        return [
            "import numpy as np",
            "import onnxruntime as ort",
            "from PIL import Image",
            "from transformers import AutoImageProcessor, AutoTokenizer",
            "",
            'image_tower = ort.InferenceSession("DIR/image_encoder/model.onnx")',
            'text_tower = ort.InferenceSession("DIR/text_encoder/model.onnx")',
            'processor = AutoImageProcessor.from_pretrained("DIR/image_encoder")',
            'tokenizer = AutoTokenizer.from_pretrained("DIR/text_encoder")',
            'pixels = processor(images=[Image.open("dog.jpg")], return_tensors="np")',
            'text = tokenizer(["a photo of a dog"], padding="max_length", truncation=True,',
            '                 return_tensors="np")',
            '(image_embeds,) = image_tower.run(["image_embeds"],',
            '                                  {"pixel_values": pixels["pixel_values"]})',
            '(text_embeds,) = text_tower.run(["text_embeds"], {k: text[k].astype(np.int64)',
            '                                for k in ("input_ids", "attention_mask")})',
            'scale = float(image_tower.get_modelmeta().custom_metadata_map["logit_scale"])',
            "logits = scale * image_embeds @ text_embeds.T  # unit vectors: cosine x scale",
        ]
    return [
        "import onnxruntime as ort",
        "from PIL import Image",
        "from transformers import AutoImageProcessor",
        "",
        'session = ort.InferenceSession("DIR/model.onnx")',
        'processor = AutoImageProcessor.from_pretrained("DIR")',
        'pixels = processor(images=[Image.open("photo.jpg")], return_tensors="np")',
        '(features,) = session.run(["features"], {"pixel_values": pixels["pixel_values"]})',
    ]
