"""``megabatch export``: the exported folder loads with transformers in a process where
megabatch cannot be imported (export_consumer.py) and gives the trained model's
embeddings, from the trainer's own inputs and from raw images and captions; the image
processor gives the trainer's evaluation pixels; bad inputs are one line each; a
cut-short export leaves no folder.

Tolerance, float32, 1e-5 (absolute, on unit embeddings; relative on SimCLR's features):
the exported weights are the checkpoint's bit for bit and transformers runs the same
modules, so the same inputs give the same embeddings up to float32 rounding (measured
3e-8 for CLIP, 2e-6 on SimCLR features of size 2). Raw captions give the trainer's ids
and mask exactly. Raw images: the held-out images here are of the kind the processor
reproduces exactly (docs/export.md, "Preprocessing": the same PIL resize on both sides),
so their pixels and embeddings are held to the same 1e-5 (measured 0 and 3e-8);
test_image_processor_pixels covers the kinds it does not, with measured bounds.
"""

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megabatch.trainer import export as export_module
from megabatch.trainer.checkpoint import MODEL_STATES
from megabatch.trainer.cli import main
from tests.trainer.runs import ROOT, ZERO2, consume, env, errors, overrides, train, weights

CONSUMER = Path(__file__).with_name("export_consumer.py")
TOL = 1e-5


def _export(run: Path, *more) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "export", str(run), *more],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=100)  # fmt: skip


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step*"))[-1]


def _trainer_side(run: Path, checkpoint: Path, inputs: Path) -> dict:
    """The trainer's evaluation features of the held-out split (eval_run._encode's
    loader and task calls, on the checkpoint's weights), and the raw samples they came
    from, written to ``inputs`` with the trainer's own model inputs."""
    from megabatch.data_pipeline.read.loader import ShardLoader
    from megabatch.data_pipeline.read.transforms import device_preprocess
    from megabatch.trainer.config import load_config
    from megabatch.trainer.data import load_tokenizer, loader_config
    from megabatch.trainer.tasks import make_task

    config = load_config(run / "config.yaml", [f"run_dir={run}"])
    tokenizer = load_tokenizer(config) if config.task == "clip" else None
    task = make_task(config, torch.device("cpu"), 1, tokenizer)
    model = task.build_model()
    model.load_state_dict(weights(checkpoint), strict=True)
    model.eval()
    loader = ShardLoader(loader_config(config, config.data.val, captions=task.captions,
                                       evaluation=True), tokenizer=tokenizer)  # fmt: skip
    out = {"images": [], "texts": [], "pixels": [], "tokens": [], "mask": [], "keys": []}
    with torch.no_grad():
        for batch in loader:
            out["images"].append(task.image_features(model, batch).float())
            out["pixels"].append(device_preprocess(batch.images, task.image).contiguous())
            if task.captions:
                out["texts"].append(task.text_features(model, batch).float())
                out["tokens"].append(batch.tokens.clone())
                out["mask"].append(batch.token_mask.long())
            out["keys"] += batch.keys
    result = {k: torch.cat(v) if k != "keys" and v else v for k, v in out.items()}
    # The raw samples, in the loader's order: image bytes as stored, captions as stored.
    inputs.mkdir()
    members = {}
    for shard in sorted(Path(config.data.val).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                members[(str(shard), m.name)] = tar.extractfile(m).read()
    captions = []
    for i, key in enumerate(result["keys"]):
        url, name = key.rsplit("#", 1)
        shard = next(s for s, _ in members if s.endswith(Path(url).name))
        (inputs / f"{i:04d}.jpg").write_bytes(members[(shard, f"{name}.jpg")])
        captions.append(members[(shard, f"{name}.txt")].decode())
    (inputs / "captions.json").write_text(json.dumps(captions))
    for name in ("pixels", "tokens", "mask"):
        if task.captions or name == "pixels":
            np.save(inputs / f"{name}.npy", result[name].numpy())
    return result


def _consume(task: str, folder: Path, inputs: Path, out: Path) -> dict:
    out.mkdir()
    consume(CONSUMER, task, folder, inputs, out, cwd=out)
    return {p.stem: np.load(p) for p in out.glob("*.npy")}


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip_export(zero2_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "clip"
    proc = _export(zero2_run, "--out", str(folder), "--format", "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(folder)
    return folder


def test_clip_export_loads_without_megabatch_and_gives_the_trained_embeddings(
    zero2_run, clip_export, tmp_path
):
    trainer = _trainer_side(zero2_run, _newest(zero2_run), tmp_path / "inputs")
    hf = _consume("clip", clip_export, tmp_path / "inputs", tmp_path / "out")
    n = len(trainer["keys"])
    assert n == 32 and hf["raw_image_embeds"].shape[0] == n
    # The same inputs: the same weights through the same transformers modules.
    assert _max_diff(hf["image_embeds"], trainer["images"]) <= TOL
    assert _max_diff(hf["text_embeds"], trainer["texts"]) <= TOL
    # Raw captions: the trainer's ids and mask exactly.
    assert np.array_equal(hf["raw_tokens"], trainer["tokens"].numpy())
    assert np.array_equal(hf["raw_mask"], trainer["mask"].numpy())
    assert _max_diff(hf["raw_text_embeds"], trainer["texts"]) <= TOL
    # Raw images: the trainer's pixels, and its embeddings.
    assert _max_diff(hf["raw_pixels"], trainer["pixels"]) <= TOL
    assert _max_diff(hf["raw_image_embeds"], trainer["images"]) <= TOL
    # The single towers give the full model's embeddings.
    assert _max_diff(hf["tower_image_embeds"], hf["raw_image_embeds"]) <= TOL
    assert _max_diff(hf["tower_text_embeds"], hf["raw_text_embeds"]) <= TOL
    # The trained logit scale (as the trainer clamps it).
    t = weights(_newest(zero2_run))["log_logit_scale"].exp().clamp(max=100.0)
    assert hf["logit_scale"][0] == pytest.approx(t.item(), rel=1e-6)


def test_clip_export_holds_no_pickle_a_card_and_a_manifest(zero2_run, clip_export):
    import hashlib

    files = sorted(
        p.relative_to(clip_export).as_posix() for p in clip_export.rglob("*") if p.is_file()
    )
    assert {Path(f).suffix for f in files} <= {".json", ".safetensors", ".md"}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "image_encoder/config.json",
                 "image_encoder/model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "README.md", "manifest.json"):  # fmt: skip
        assert name in files
    manifest = json.loads((clip_export / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((clip_export / name).read_bytes()).hexdigest()
    assert manifest["step"] == 2 and manifest["task"] == "clip"
    config = json.loads((clip_export / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    for sub in ("image_encoder", "text_encoder"):
        sub_config = json.loads((clip_export / sub / "config.json").read_text())
        assert sub_config["projection_dim"] == config["projection_dim"] == 128
    pre = json.loads((clip_export / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 16} and pre["crop_size"] == {"height": 16, "width": 16}
    card = (clip_export / "README.md").read_text()
    for fact in ("steps: 2; samples seen: 32", "global batch: 16", "training shards",
                 "retrieval_i2t_r1", "CLIPModel.from_pretrained"):  # fmt: skip
        assert fact in card


# --------------------------------------------------------------------------- SimCLR
def test_simclr_export_is_the_backbone_that_the_probe_reads(simclr_run, tmp_path):
    folder = tmp_path / "simclr"
    proc = _export(simclr_run, "--out", str(folder), "--format", "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = _trainer_side(simclr_run, _newest(simclr_run), tmp_path / "inputs")
    hf = _consume("simclr", folder, tmp_path / "inputs", tmp_path / "out")
    assert str(hf["model_class"]) == "ResNetModel"
    assert hf["features"].shape == tuple(trainer["images"].shape) == (32, 256)
    scale = float(np.abs(trainer["images"].numpy()).max())
    assert _max_diff(hf["features"], trainer["images"]) <= TOL * max(scale, 1.0)
    assert _max_diff(hf["raw_pixels"], trainer["pixels"]) <= TOL
    assert _max_diff(hf["raw_features"], trainer["images"]) <= TOL * max(scale, 1.0)
    # The backbone alone: no projection head, no pickle.
    keys = _safetensor_keys(folder / "model.safetensors")
    assert keys and not any("head" in k for k in keys)
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} <= {".json", ".safetensors", ".md"}
    assert "AutoModel.from_pretrained" in (folder / "README.md").read_text()


def _safetensor_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# --------------------------------------------------------------------------- ZeRO, precision
def _exported_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _as_exported(module: dict) -> dict:
    """A ClipModel state dict under CLIPModel's names (the scale left out)."""
    return {k[len("clip.") :]: v for k, v in module.items() if k.startswith("clip.")
            and k != "clip.logit_scale"}  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "ranks"),
    [({"engine.zero_stage": 1}, 2), ({"engine.zero_stage": 2, "engine.precision": "bf16"}, 1)],
    ids=["zero1-2ranks-fp32", "zero2-bf16"],
)
def test_zero_partitions_are_gathered_into_float32_weights(data, tmp_path, capsys, extra, ranks):
    """ZeRO 1/2 partition the fp32 master weights across the ranks' optimizer files. Two
    fp32 ranks: gathered, they are the module file's weights exactly. bf16: the export
    holds the gathered fp32 masters, which round to the module file's bf16 weights."""
    from megabatch.trainer.checkpoint import read_checkpoint, zero_master_weights

    run = tmp_path / "run"
    proc = train(overrides(data, run, **{**ZERO2, **extra}), ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = read_checkpoint(_newest(run))
    assert len(list((checkpoint.path / "state").glob("*zero_pp_rank_*"))) == ranks
    module = weights(checkpoint.path)
    master = zero_master_weights(checkpoint)
    assert set(master) == set(module) - {"clip.logit_scale"}
    for name, value in master.items():
        assert value.dtype == torch.float32
        assert torch.equal(value.to(module[name].dtype), module[name]), name
    code, lines = _cli(capsys, run, "--out", tmp_path / "out", "--format", "hf")
    assert code == 0, lines
    exported = _exported_weights(tmp_path / "out")
    for name, value in _as_exported(master).items():
        assert torch.equal(exported[name], value), name
    if "engine.precision" in extra:  # the masters, not the bf16 weights
        name = "visual_projection.weight"
        assert not torch.equal(exported[name], module[f"clip.{name}"].float())


# --------------------------------------------------------------------------- bad inputs
def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["export", *map(str, argv)])
    return code, errors(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("formats", "said"),
    [("tflite", "unknown --format 'tflite' (choose from hf, onnx)"),
     ("hf,onnx,torchscript", "unknown --format 'torchscript'"), (",", "--format is empty")],
)  # fmt: skip
def test_unknown_formats_are_one_line(zero2_run, tmp_path, capsys, formats, said):
    code, lines = _cli(capsys, zero2_run, "--out", tmp_path / "x", "--format", formats)
    assert code == 2 and len(lines) == 1 and said in lines[0], lines
    assert lines[0].startswith("megabatch export: error: ")
    assert not (tmp_path / "x").exists()


def test_help_and_docs_agree():
    """Every option of `megabatch export --help` is in docs/export.md, and the reverse."""
    import argparse
    import re

    commands = argparse.ArgumentParser().add_subparsers()
    export_module.add_export_command(commands)
    parser = commands.choices["export"]
    options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    docs = (ROOT / "docs" / "export.md").read_text().split("## Embedding with the export")[0]
    assert options - {"--help"} == set(re.findall(r"`(--[a-z]+)", docs))


def test_format_list_parses():
    assert export_module.parse_formats("hf") == ("hf",)
    assert export_module.parse_formats(" HF , hf ") == ("hf",)
    assert export_module.parse_formats("ONNX,hf") == ("onnx", "hf")
    assert export_module.parse_formats(export_module.DEFAULT_FORMATS) == ("hf", "onnx")


def test_bad_runs_and_checkpoints_are_one_line(zero2_run, simclr_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(zero2_run / "config.yaml", empty / "config.yaml")
    incomplete = tmp_path / "step00000009"
    shutil.copytree(_newest(zero2_run) / "state", incomplete / "state")
    cases = [
        ((tmp_path / "nothing",), "is not a run directory"),
        ((empty,), "no complete checkpoint to export"),
        (
            (zero2_run, "--checkpoint", _newest(simclr_run)),
            "holds another model than the run's config: task 'simclr' -> 'clip'",
        ),
        ((zero2_run, "--checkpoint", incomplete), "is not a complete checkpoint"),
        ((zero2_run, "--checkpoint", tmp_path / "missing"), "no checkpoint directory"),
    ]
    other_model = tmp_path / "other_model"
    other_model.mkdir()
    config = yaml.safe_load((zero2_run / "config.yaml").read_text())
    config["model"]["embed_dim"] = 64
    (other_model / "config.yaml").write_text(yaml.safe_dump(config))
    cases.append(((other_model, "--checkpoint", _newest(zero2_run)),
                  "holds another model than the run's config: model.embed_dim None -> 64"))  # fmt: skip
    for argv, said in cases:
        code, lines = _cli(capsys, *argv, "--out", tmp_path / "out")
        assert code == 2 and len(lines) == 1 and said in lines[0], (argv, lines)
    assert not (tmp_path / "out").exists()


def test_weights_of_another_model_are_one_line(zero2_run):
    from megabatch.trainer.export_hf import WeightsMismatch, clip_model
    from megabatch.trainer.models.clip import clip_config

    module = weights(_newest(zero2_run))
    config = clip_config("tiny", image_size=16, context_length=8, vocab_size=300, pad_id=0,
                         sot_id=2, eot_id=1, embed_dim=64)  # fmt: skip
    with pytest.raises(WeightsMismatch) as err:
        clip_model(config, module, 100.0)
    assert "\n" not in str(err.value)
    assert "visual_projection.weight (128, 128) != (64, 128)" in str(err.value)
    with pytest.raises(WeightsMismatch, match="unexpected head.0.weight"):
        clip_model(config, {**module, "head.0.weight": torch.zeros(1)}, 100.0)


class _Planted:
    pass


def test_a_checkpoint_that_needs_unpickling_code_is_refused(zero2_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run, ignore=shutil.ignore_patterns("export"))
    torch.save({"module": {"x": _Planted()}}, _newest(run) / "state" / MODEL_STATES)
    code, lines = _cli(capsys, run, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "refusing to load" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_an_existing_folder_needs_overwrite(zero2_run, clip_export, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, lines = _cli(capsys, zero2_run, "--out", out, "--format", "hf")
    assert code == 2 and len(lines) == 1 and "exists (pass --overwrite" in lines[0]
    assert (out / "mine.txt").read_text() == "keep"
    code, _ = _cli(capsys, zero2_run, "--out", out, "--overwrite", "--format", "hf")
    assert code == 0 and not (out / "mine.txt").exists()
    assert (out / "model.safetensors").read_bytes() == (
        clip_export / "model.safetensors"
    ).read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or old folder left


def test_an_export_cut_short_leaves_no_folder(zero2_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-99999"  # what an export killed with SIGKILL leaves
    stale.mkdir()

    def killed(path, plan):  # the model files are written by now
        assert any(path.parent.glob("*.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["export", str(zero2_run), "--out", str(out), "--format", "hf"])
    assert list(tmp_path.iterdir()) == []  # neither DIR nor the partial folders


# --------------------------------------------------------------------------- pixels
def _image(width: int, height: int, fmt: str) -> bytes:
    """A smooth colour field with 5% noise (harder on resampling than most photos)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x + 1) / 2 + 0.5, np.cos(5 * y) / 2 + 0.5, x * y], -1)
    rgb += 0.05 * np.random.default_rng(width * 1000 + height).standard_normal(rgb.shape)
    buf = io.BytesIO()
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


# (side, load_size, width, height, format, mean bound, max bound), differences in
# normalised units (one grey level is about 0.015). Exact: square images (any size,
# except JPEGs of twice the side or more, which the trainer decodes at reduced DCT
# scale), images whose shorter side is the model's. Bounded: the rest (bounds a little
# over the differences measured, docs/export.md).
PIXEL_CASES = [
    (16, None, 16, 16, "JPEG", 0, 0), (16, None, 40, 40, "PNG", 0, 0),
    (16, None, 24, 24, "JPEG", 0, 0), (16, None, 16, 48, "JPEG", 0, 0),
    (224, None, 677, 677, "PNG", 0, 0), (224, None, 224, 672, "PNG", 0, 0),
    (16, None, 53, 53, "JPEG", 0.07, 0.35), (16, None, 27, 23, "PNG", 0.05, 0.3),
    (224, None, 640, 480, "PNG", 0.015, 0.15), (224, None, 640, 480, "JPEG", 0.03, 0.25),
    (224, 256, 640, 480, "PNG", 0.025, 0.2), (224, 256, 224, 224, "PNG", 0.1, 0.7),
]  # fmt: skip


@pytest.mark.parametrize(("side", "load", "width", "height", "fmt", "mean", "most"), PIXEL_CASES)
def test_image_processor_pixels(side, load, width, height, fmt, mean, most):
    from PIL import Image

    from megabatch.data_pipeline.read.transforms import (
        ImageConfig,
        decode_resize_crop,
        device_preprocess,
    )
    from megabatch.trainer.export_hf import image_processor

    data = _image(width, height, fmt)
    image = ImageConfig(size=side, load_size=load, decoder="pil")
    loaded = torch.from_numpy(decode_resize_crop(data, load or side, "pil"))
    trainer = device_preprocess(loaded.permute(2, 0, 1)[None], image)
    hf = image_processor(image)(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
    diff = (hf["pixel_values"] - trainer).abs()
    assert diff.mean() <= mean + 1e-6 and diff.max() <= most + 1e-5
