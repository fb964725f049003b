"""``megabatch export RUN``: a run's checkpoint as a folder that downstream teams load
with transformers alone (docs/export.md).

Reads RUN/config.yaml and one complete checkpoint (the newest whose loss was finite, or
``--checkpoint PATH``); the weights come from ``checkpoint.model_weights`` (weights-only
loads: no code unpickled): rank 0's module file, which holds every parameter under ZeRO
1 and 2, with the float32 master weights gathered from the ranks' optimizer partitions
for bf16/fp16 runs. Stage 3, which would partition the parameters, is refused.

The folder is built under ``.DIR.partial-PID`` beside DIR and renamed into place when
every file is written (``atomic_folder``): an export cut short (an error, Ctrl-C,
SIGTERM) removes its partial folder, and one killed outright leaves only the hidden
partial folder, which the next export to the same DIR removes. DIR is never half
written. Files: export_hf's (transformers' own: JSON and safetensors), the model card
README.md (``write_model_card``) and manifest.json, the sha256 of every other file
(``write_manifest``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from megabatch.trainer.atomic_folder import FolderExists, atomic_folder
from megabatch.trainer.checkpoint import MODEL_STATES, Checkpoint, CheckpointError, read_checkpoint
from megabatch.trainer.config import ConfigError, RunConfig, load_config
from megabatch.trainer.resume import config_changes, latest_checkpoint, refused_changes

FORMATS = ("hf",)
NOT_BUILT_YET = ("onnx",)
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
        help="write a run's checkpoint as a Hugging Face (transformers) model folder",
        description="Write RUN's newest complete checkpoint (or --checkpoint PATH) as a "
        "folder transformers loads with nothing of megabatch: CLIP as CLIPModel + "
        "CLIPProcessor (tokenizer, image processor) with image_encoder/ and text_encoder/ "
        "(CLIPVisionModelWithProjection, CLIPTextModelWithProjection); SimCLR as its "
        "backbone without the projection head (AutoModel) + image processor. Adds a model "
        "card (README.md) and manifest.json (sha256 of every file). Safetensors and JSON "
        "only; written under a temporary name and renamed when complete. See "
        "docs/export.md. Exit status: 0 written, 2 bad input.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN")
    export.add_argument("--checkpoint", default="latest", metavar="latest|PATH",
                        help="latest (default): the newest complete checkpoint whose loss "
                        "was finite; or a checkpoint directory RUN/checkpoints/stepNNNNNNNN")  # fmt: skip
    export.add_argument("--out", type=Path, metavar="DIR",
                        help="the folder to write (default RUN/export/stepNNNNNNNN)")  # fmt: skip
    export.add_argument("--format", default="hf", metavar="FORMATS",
                        help="comma-separated formats; hf (the default) is the one built "
                        "so far (onnx is not built yet)")  # fmt: skip
    export.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it exists (else an existing DIR is refused)")  # fmt: skip
    export.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        plan = plan_export(args.run_dir, args.checkpoint, args.out, args.format, args.overwrite)
        with _stop_signals_raise():
            out = export(plan)
    except (ExportError, ConfigError, CheckpointError) as exc:
        print(f"megabatch export: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def _stop_signals_raise():
    """SIGTERM (a scheduler, ``kill``) raises SystemExit, so that the partial folder is
    removed on the way out, as for Ctrl-C."""

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- the plan
def parse_formats(text: str) -> tuple[str, ...]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ExportError("--format is empty (use hf)")
    for name in names:
        if name in NOT_BUILT_YET:
            raise ExportError(f"--format {name} is not built yet (only hf so far)")
        if name not in FORMATS:
            raise ExportError(f"unknown --format {name!r} (choose from {', '.join(FORMATS)})")
    return tuple(dict.fromkeys(names))


def plan_export(run_dir: Path, checkpoint: str = "latest", out: Path | None = None,
                formats: str = "hf", overwrite: bool = False) -> ExportPlan:  # fmt: skip
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
    """Write plan.out (atomically); returns it."""
    from megabatch.trainer import export_hf
    from megabatch.trainer.checkpoint import model_weights
    from megabatch.trainer.data import image_config

    _quiet_transformers()
    module = model_weights(plan.checkpoint)
    config, processor = plan.config, export_hf.image_processor(image_config(plan.config))
    try:
        if config.task == "clip":
            tokenizer = _tokenizer(config)
            model = export_hf.clip_model(_clip_config(config, tokenizer), module,
                                         config.loss.max_logit_scale)  # fmt: skip

            def write(folder):
                export_hf.write_clip(folder, model, export_hf.clip_tokenizer(tokenizer), processor)
        else:
            encoder = export_hf.simclr_encoder(config.model.preset, config.model.image_size,
                                               module)  # fmt: skip

            def write(folder):
                export_hf.write_simclr(folder, encoder, processor)
    except export_hf.WeightsMismatch as exc:
        raise ExportError(f"{plan.checkpoint.path}: {exc}") from None
    try:
        with atomic_folder(plan.out, plan.overwrite) as folder:
            write(folder)
            write_model_card(folder / CARD, plan)
            write_manifest(folder, plan)
    except FolderExists as exc:  # DIR appeared while we wrote
        raise ExportError(str(exc)) from None
    return plan.out


def _quiet_transformers() -> None:
    """No progress bars or backend notices on stderr: the command's output is DIR, or
    one error line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _tokenizer(config: RunConfig):
    from megabatch.trainer.data import load_tokenizer

    return load_tokenizer(config)


def _clip_config(config: RunConfig, tokenizer):
    from megabatch.trainer.models.clip import clip_config

    m = config.model
    return clip_config(
        m.preset, image_size=m.image_size, context_length=m.context_length,
        vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, sot_id=tokenizer.sot_id,
        eot_id=tokenizer.eot_id, embed_dim=m.embed_dim,
        init_logit_scale=config.loss.init_logit_scale,
    )  # fmt: skip


# --------------------------------------------------------------------------- card, manifest
def write_manifest(folder: Path, plan: ExportPlan) -> None:
    """manifest.json: where the export came from and the sha256 and size of every other
    file under ``folder`` (paths relative, with /)."""
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
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def write_model_card(path: Path, plan: ExportPlan) -> None:
    """README.md: training data, steps, batch, evaluation, preprocessing, how to load."""
    from megabatch.trainer.data import image_config

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
        f"tags: [megabatch, {config.task}, contrastive]",
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
        f"- engine: ZeRO stage {config.engine.zero_stage}, {config.engine.precision}; "
        + (
            "exported in float32"
            if config.engine.precision == "fp32" or config.engine.zero_stage == 0
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
    lines += ["", "## Loading", "", "```python", *_snippet(clip), "```", ""]
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
