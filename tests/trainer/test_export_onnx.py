"""``megabatch export --format onnx``: the .onnx files load with onnxruntime in a process
where neither megabatch nor torch can be imported (onnx_consumer.py), carry the
contract's names, shapes, dynamic batch axis and metadata, and give the trained model's
embeddings from the trainer's own inputs and from raw images and captions through the
folder's processor and tokenizer; a check beyond the tolerance, or no shards to check
on, is one line and writes nothing.

Tolerance, float32: export_onnx.TOLERANCE (1e-4), absolute on CLIP's unit embeddings,
relative to the largest feature on SimCLR's. The ONNX files are the transformers towers
(test_export.py: within 1e-5 of the trainer, measured 3e-8) run by onnxruntime, which
fuses and reorders float32 ops: measured 1.2e-7 on the CLIP towers, 1.2e-6 relative on
SimCLR's features (2.6e-6 on values up to 2.1). Raw inputs: the processor gives the
trainer's pixels and the tokenizer its ids here (test_export.py), so they are held to
the same bound.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from megabatch.trainer import export_onnx
from megabatch.trainer.cli import main
from tests.trainer.runs import consume, weights
from tests.trainer.test_export import _export, _max_diff, _newest, _trainer_side

CONSUMER = Path(__file__).with_name("onnx_consumer.py")
TOL = export_onnx.TOLERANCE
PICKLES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _consume(task: str, folder: Path, inputs: Path, out: Path) -> tuple[dict, dict]:
    out.mkdir()
    consume(CONSUMER, task, folder, inputs, out, cwd=out)
    arrays = {p.stem: np.load(p) for p in out.glob("*.npy")}
    return arrays, json.loads((out / "files.json").read_text())


def _exported(run: Path, folder: Path, formats: str) -> Path:
    """The command as a user runs it: DIR on stdout, nothing on stderr."""
    proc = _export(run, "--out", str(folder), "--format", formats)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(folder) and proc.stderr == "", proc.stderr[-3000:]
    return folder


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _manifest_matches(folder: Path) -> dict:
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == _files(folder) - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return manifest


# --------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def clip_onnx(zero2_run, tmp_path_factory):
    return _exported(zero2_run, tmp_path_factory.mktemp("onnx") / "clip", "hf,onnx")


@pytest.fixture(scope="module")
def clip_trainer(zero2_run, tmp_path_factory):
    inputs = tmp_path_factory.mktemp("clip_inputs") / "inputs"
    return inputs, _trainer_side(zero2_run, _newest(zero2_run), inputs)


def test_clip_onnx_runs_without_megabatch_or_torch_and_gives_the_trained_embeddings(
    zero2_run, clip_onnx, clip_trainer, tmp_path
):
    inputs, trainer = clip_trainer
    onnx, files = _consume("clip", clip_onnx, inputs, tmp_path / "out")
    n = len(trainer["keys"])
    assert n == 32 and onnx["raw_image_embeds"].shape == (n, 128)
    # The trainer's own pixels and token ids.
    assert _max_diff(onnx["image_embeds"], trainer["images"]) <= TOL
    assert _max_diff(onnx["text_embeds"], trainer["texts"]) <= TOL
    # Raw images through the folder's processor, raw captions through its tokenizer.
    assert np.array_equal(onnx["raw_tokens"], trainer["tokens"].numpy())
    assert np.array_equal(onnx["raw_mask"], trainer["mask"].numpy())
    assert _max_diff(onnx["raw_pixels"], trainer["pixels"]) <= 1e-5
    assert _max_diff(onnx["raw_image_embeds"], trainer["images"]) <= TOL
    assert _max_diff(onnx["raw_text_embeds"], trainer["texts"]) <= TOL
    # The dynamic batch axis: one sample alone gives its row of the whole batch.
    assert _max_diff(onnx["raw_image_embeds_1"], onnx["raw_image_embeds"][:1]) <= TOL
    assert _max_diff(onnx["raw_text_embeds_1"], onnx["raw_text_embeds"][:1]) <= TOL
    # Unit vectors, and the card's snippet gives the same with the trained scale.
    assert np.allclose(np.linalg.norm(onnx["raw_image_embeds"], axis=1), 1, atol=1e-5)
    assert _max_diff(onnx["card_image_embeds"], onnx["raw_image_embeds_1"]) <= TOL
    assert _max_diff(onnx["card_text_embeds"], onnx["raw_text_embeds_1"]) <= TOL
    scale = weights(_newest(zero2_run))["log_logit_scale"].exp().clamp(max=100.0).item()
    expected = scale * float(trainer["images"][0] @ trainer["texts"][0])
    assert onnx["card_logits"][0, 0] == pytest.approx(expected, abs=scale * TOL * 2)

    image, text = files["image_encoder/model.onnx"], files["text_encoder/model.onnx"]
    assert image["inputs"] == [["pixel_values", "tensor(float)", ["batch", 3, 16, 16]]]
    assert image["outputs"] == [["image_embeds", "tensor(float)", ["batch", 128]]]
    assert text["inputs"] == [["input_ids", "tensor(int64)", ["batch", 8]],
                              ["attention_mask", "tensor(int64)", ["batch", 8]]]  # fmt: skip
    assert text["outputs"] == [["text_embeds", "tensor(float)", ["batch", 128]]]
    for tower, meta in (("image", image["metadata"]), ("text", text["metadata"])):
        assert meta["tower"] == tower and meta["task"] == "clip" and meta["preset"] == "tiny"
        assert (meta["image_size"], meta["context_length"], meta["embedding_dim"]) == (
            "16", "8", "128")  # fmt: skip
        assert meta["normalised"] == "yes" and meta["step"] == "2"
        assert meta["image_mean"] == "0.48145466,0.4578275,0.40821073"
        assert float(meta["logit_scale"]) == pytest.approx(scale, rel=1e-6)
        assert meta["megabatch_version"] and "L2-normalised" in meta["outputs"]
    assert "pixel_values: float32 (batch, 3, 16, 16)" in image["description"]
    assert "attention_mask: int64 (batch, 8)" in text["description"]


def test_clip_hf_and_onnx_folder_is_documented_and_checked(clip_onnx):
    import onnx

    files = _files(clip_onnx)
    assert {"model.safetensors", "image_encoder/model.safetensors", "image_encoder/model.onnx",
            "text_encoder/model.onnx", "text_encoder/tokenizer.json"} <= files  # fmt: skip
    assert not {Path(f).suffix for f in files} & PICKLES
    manifest = _manifest_matches(clip_onnx)
    assert manifest["formats"] == ["hf", "onnx"]
    for name in ("image_encoder/model.onnx", "text_encoder/model.onnx"):
        check = manifest["onnx_checks"][name]
        assert 0 <= check["max_abs_diff"] <= TOL and check["tolerance"] == TOL
        assert check["batch_sizes"] == [1, 32] and check["shards"] == "data.val"
        model = onnx.load(clip_onnx / name)  # single file: the weights inside
        assert model.doc_string and all(v.doc_string for v in [*model.graph.input,
                                                                *model.graph.output])  # fmt: skip
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                       for t in model.graph.initializer)  # fmt: skip
    card = (clip_onnx / "README.md").read_text()
    for fact in ("CLIPModel.from_pretrained", "import onnxruntime as ort",
                 "| `text_encoder/model.onnx` | `input_ids` int64 (batch, 8)",
                 "`image_embeds` float32 (batch, 128), L2-normalised"):  # fmt: skip
        assert fact in card


def test_onnx_alone_writes_the_processors_and_no_weights_of_transformers(
    zero2_run, tmp_path, capsys
):
    out = tmp_path / "onnx"
    assert main(["export", str(zero2_run), "--out", str(out), "--format", "onnx"]) == 0
    assert capsys.readouterr().err == ""
    assert _files(out) == {
        "README.md", "manifest.json", "tokenizer.json", "tokenizer_config.json",
        "preprocessor_config.json", "image_encoder/model.onnx",
        "image_encoder/preprocessor_config.json", "text_encoder/model.onnx",
        "text_encoder/tokenizer.json", "text_encoder/tokenizer_config.json",
    }  # fmt: skip
    manifest = _manifest_matches(out)
    assert manifest["formats"] == ["onnx"] and len(manifest["onnx_checks"]) == 2
    card = (out / "README.md").read_text()
    assert "import onnxruntime" in card and "CLIPModel.from_pretrained" not in card


# --------------------------------------------------------------------------- SimCLR
def test_simclr_onnx_gives_the_features_the_probe_reads(simclr_run, tmp_path):
    folder = _exported(simclr_run, tmp_path / "simclr", "hf,onnx")
    trainer = _trainer_side(simclr_run, _newest(simclr_run), tmp_path / "inputs")
    onnx, files = _consume("simclr", folder, tmp_path / "inputs", tmp_path / "out")
    assert onnx["features"].shape == tuple(trainer["images"].shape) == (32, 256)
    scale = max(1.0, float(np.abs(trainer["images"].numpy()).max()))
    assert _max_diff(onnx["features"], trainer["images"]) <= TOL * scale
    assert _max_diff(onnx["raw_features"], trainer["images"]) <= TOL * scale
    assert _max_diff(onnx["raw_features_1"], onnx["raw_features"][:1]) <= TOL * scale
    assert _max_diff(onnx["card_features"], onnx["raw_features_1"]) <= TOL * scale
    model = files["model.onnx"]
    assert model["inputs"] == [["pixel_values", "tensor(float)", ["batch", 3, 16, 16]]]
    assert model["outputs"] == [["features", "tensor(float)", ["batch", 256]]]
    meta = model["metadata"]
    assert (meta["task"], meta["tower"], meta["normalised"], meta["embedding_dim"]) == (
        "simclr", "backbone", "no", "256")  # fmt: skip
    assert "logit_scale" not in meta and "context_length" not in meta
    files = _files(folder)
    assert {"model.onnx", "model.safetensors", "preprocessor_config.json"} <= files
    assert not {Path(f).suffix for f in files} & PICKLES
    check = _manifest_matches(folder)["onnx_checks"]["model.onnx"]
    assert check["max_abs_diff"] <= check["tolerance"] == pytest.approx(TOL * scale, rel=1e-6)


# --------------------------------------------------------------------------- failures
def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megabatch export: error: "), lines
    return lines[0]


def test_a_check_beyond_the_tolerance_writes_nothing(zero2_run, tmp_path, monkeypatch, capsys):
    run = export_onnx._run

    def drifted(session, tower, feed):  # onnxruntime's output off by twice the tolerance
        return run(session, tower, feed) + 2 * TOL

    monkeypatch.setattr(export_onnx, "_run", drifted)
    code = main(["export", str(zero2_run), "--out", str(tmp_path / "out")])  # hf,onnx
    line = _one_error_line(capsys)
    said = ("image_encoder/model.onnx: onnxruntime differs from PyTorch by 0.0002 on 32 "
            "held-out samples (data.val), more than the tolerance 1e-4")  # fmt: skip
    assert code == 2 and said in line, line
    assert list(tmp_path.iterdir()) == []  # neither DIR (its hf files) nor a partial folder


def test_no_readable_shards_is_one_line_and_writes_nothing(zero2_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero2_run, run, ignore=shutil.ignore_patterns("export"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["val"], config["data"]["train"] = str(tmp_path / "gone"), None
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    code = main(["export", str(run), "--out", str(out)])
    line = _one_error_line(capsys)
    assert code == 2 and "none can be read (data.val: no such file or folder:" in line
    assert "data.train is not set" in line and "--format hf needs no shards" in line
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert main(["export", str(run), "--out", str(out), "--format", "hf"]) == 0
