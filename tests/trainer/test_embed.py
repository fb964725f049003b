"""``megabatch embed``: an export folder's embeddings of an image folder, a caption file
and shards, equal to what transformers computes from the same folder; bad inputs
skipped and counted as the loader counts them; bad arguments one line and exit 2 with
no file; a cut-short run leaves no file.

Tolerance, float32, 1e-5 absolute on unit vectors (relative on SimCLR's features): the
command and the reference here use the same weights and the same PIL image processor
and tokenizer on the same decoded images and captions, so the model inputs are equal and
the vectors differ only by float32 rounding in other batch shapes (and, for CLIP, the
single towers against ``CLIPModel``: the same modules). Measured: 6e-8 for CLIP images
and captions, 0 for SimCLR features. ONNX against transformers, the same inputs through
onnxruntime's kernels: 1e-5 allowed, measured 1.2e-7 on CLIP's unit vectors and 1.1e-6
relative on SimCLR's features (largest about 3).
"""

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megabatch.trainer.cli import main
from tests.trainer.runs import ROOT, env

TOL = 1e-5
ONNX_TOL = 1e-5


def _export(run: Path, out: Path, formats: str = "hf,onnx") -> Path:
    proc = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "export", str(run),
                           "--out", str(out), "--format", formats],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def clip_export(zero2_run, tmp_path_factory):
    return _export(zero2_run, tmp_path_factory.mktemp("embed") / "clip")


@pytest.fixture(scope="module")
def simclr_export(simclr_run, tmp_path_factory):
    return _export(simclr_run, tmp_path_factory.mktemp("embed-simclr") / "export")


def _embed(capsys, *argv) -> tuple[int, str, list[str]]:
    """Exit status, stdout, and stderr's lines that are megabatch's own."""
    code = main(["embed", *map(str, argv)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("megabatch")]
    return code, captured.out.strip(), lines


def _read(path: Path) -> tuple[list[str], dict[str, np.ndarray], dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    vectors = {name: np.stack(table.column(name).to_numpy(zero_copy_only=False))
               for name in table.column_names if name != "key"}  # fmt: skip
    return (
        table.column("key").to_pylist(),
        vectors,
        json.loads(table.schema.metadata[b"megabatch.embed"]),
    )


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _clip_reference(folder: Path, images: list | None = None, captions: list | None = None):
    """``CLIPModel``'s unit embeddings, preprocessed as docs/export.md says: its
    ``CLIPProcessor`` with the PIL image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor(image_processor=AutoImageProcessor.from_pretrained(folder, backend="pil"),
                              tokenizer=AutoTokenizer.from_pretrained(folder))  # fmt: skip
    inputs = processor(text=captions or ["x"], images=images or [Image.new("RGB", (16, 16))],
                       padding="max_length", truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        out = model(**inputs)
    return out.image_embeds.numpy(), out.text_embeds.numpy()


def _image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = (rng.random((size[1], size[0], channels)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Five images (formats, modes, shapes, a subfolder, an upper-case extension), one
    corrupt JPEG and one text file."""
    folder = tmp_path / "images"
    _image(folder / "a.jpg", (24, 24))
    _image(folder / "b_rgba.png", (40, 30), "RGBA", seed=1)
    _image(folder / "c_grey.png", (16, 48), "L", seed=2)
    _image(folder / "sub" / "d.webp", (33, 21), seed=3)
    _image(folder / "sub" / "e.JPG", (20, 64), seed=4)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


IMAGE_KEYS = ["a.jpg", "b_rgba.png", "c_grey.png", "sub/d.webp", "sub/e.JPG"]


# --------------------------------------------------------------------------- CLIP
def test_image_folder_gives_clipmodels_embeddings_and_counts_what_it_skips(
    clip_export, image_dir, tmp_path, capsys
):
    folder = clip_export
    out = tmp_path / "out" / "images.parquet"
    code, stdout, lines = _embed(capsys, folder, "--images", image_dir, "--out", out,
                                 "--batch-size", 2)  # fmt: skip
    assert code == 0 and stdout == str(out), lines
    assert lines[-1] == ("megabatch embed: embedded 5 images, skipped 2 (1 corrupt, 1 not an "
                         "image file)")  # fmt: skip
    keys, vectors, meta = _read(out)
    assert keys == IMAGE_KEYS and list(vectors) == ["image_embeds"]
    reference, _ = _clip_reference(folder, images=[Image.open(image_dir / k) for k in keys])
    assert _max_diff(vectors["image_embeds"], reference) <= TOL
    assert meta["columns"] == {"image_embeds": {"normalized": True, "dimension": 128}}
    assert meta["export_dir"] == str(folder.resolve()) and meta["backend"] == "transformers"
    assert meta["source"] == {"kind": "images", "path": str(image_dir.resolve())}
    assert [p.name for p in out.parent.iterdir()] == ["images.parquet"]  # no partial file


def test_caption_file_keys_are_line_numbers(clip_export, tmp_path, capsys):
    folder = clip_export
    captions = tmp_path / "captions.txt"
    captions.write_bytes(b"\xef\xbb\xbfa photo of sample 3\r\n\n  a dog  \n\xff bad\n"
                         b"a photo of sample 40 that is longer than the context\n\n")  # fmt: skip
    out = tmp_path / "captions.parquet"
    code, _, lines = _embed(capsys, folder, "--captions", captions, "--out", out)
    assert code == 0 and lines[-1].endswith("embedded 3 captions, skipped 1 (1 caption not UTF-8)")
    keys, vectors, _ = _read(out)
    assert keys == ["1", "3", "5"] and list(vectors) == ["text_embeds"]
    texts = ["a photo of sample 3", "a dog", "a photo of sample 40 that is longer than the context"]
    _, reference = _clip_reference(folder, captions=texts)
    assert _max_diff(vectors["text_embeds"], reference) <= TOL


def _loader_side(shards: Path, tokenizer: Path) -> tuple[set[str], dict]:
    """The loader's keys and skip counts over ``shards``, as evaluation reads them."""
    from megabatch.data_pipeline.read.loader import LoaderConfig, ShardLoader
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
    from megabatch.data_pipeline.read.transforms import ImageConfig

    loader = ShardLoader(LoaderConfig(shards=str(shards), batch_size=8, num_workers=0,
                                      shuffle_block=1, pin_memory=False,
                                      image=ImageConfig(size=16)),
                         tokenizer=CaptionTokenizer.load(tokenizer, 8))  # fmt: skip
    keys = {key for batch in loader for key in batch.keys}
    return keys, {k: v for k, v in loader.skipped_total.items() if v}


def test_shards_give_both_columns_with_the_loaders_keys_and_skips(
    clip_export, data, tmp_path, capsys
):
    from tests.data_pipeline.fake_shards import write_shards

    folder = clip_export
    shards = tmp_path / "shards"
    write_shards(shards, 7, per_shard=3, corrupt={2}, no_caption={4}, bad_caption={5})
    out = tmp_path / "shards.parquet"
    code, _, lines = _embed(capsys, folder, "--shards", shards, "--out", out, "--batch-size", 3)
    assert code == 0 and lines[-1].endswith(
        "embedded 4 samples, skipped 3 (1 corrupt, 1 no caption, 1 caption not UTF-8)"
    )
    keys, vectors, meta = _read(out)
    loader_keys, loader_skips = _loader_side(shards, data / "tok.json")
    assert set(keys) == loader_keys and len(keys) == 4
    assert loader_skips == {"corrupt_image": 1, "missing_caption": 1, "bad_caption": 1}
    assert list(vectors) == ["image_embeds", "text_embeds"] and meta["source"]["kind"] == "shards"
    # Each row is its sample's image and caption.
    members = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as f:
            members.update({f"{tar}#{m.name}": f.extractfile(m).read() for m in f.getmembers()})
    images = [Image.open(io.BytesIO(members[f"{k}.jpg"])) for k in keys]
    texts = [members[f"{k}.txt"].decode() for k in keys]
    reference_images, reference_texts = _clip_reference(folder, images, texts)
    assert _max_diff(vectors["image_embeds"], reference_images) <= TOL
    assert _max_diff(vectors["text_embeds"], reference_texts) <= TOL


# --------------------------------------------------------------------------- SimCLR
def test_simclr_export_gives_the_probes_features(simclr_export, image_dir, data, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModel

    folder = simclr_export
    out = tmp_path / "features.parquet"
    code, _, lines = _embed(capsys, folder, "--images", image_dir, "--out", out)
    assert code == 0, lines
    keys, vectors, meta = _read(out)
    assert keys == IMAGE_KEYS and list(vectors) == ["features"]
    assert meta["columns"] == {"features": {"normalized": False, "dimension": 256}}
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    with torch.no_grad():
        pixels = processor(images=[Image.open(image_dir / k) for k in keys], return_tensors="pt")
        reference = model(**pixels).pooler_output.flatten(1).numpy()
    assert _max_diff(vectors["features"], reference) <= TOL * max(1.0, np.abs(reference).max())
    # Shards: images only, whatever captions they hold.
    code, _, _ = _embed(capsys, folder, "--shards", data / "val", "--out", tmp_path / "s.parquet")
    keys, vectors, _ = _read(tmp_path / "s.parquet")
    assert code == 0 and len(keys) == 32 and list(vectors) == ["features"]
    # Every image-only method's export is a backbone like SimCLR's (BYOL's, here).
    byol = tmp_path / "byol"
    shutil.copytree(folder, byol)
    manifest = json.loads((byol / "manifest.json").read_text())
    (byol / "manifest.json").write_text(json.dumps({**manifest, "task": "byol"}))
    code, _, _ = _embed(capsys, byol, "--shards", data / "val", "--out", tmp_path / "b.parquet")
    assert code == 0
    assert np.array_equal(_read(tmp_path / "b.parquet")[1]["features"], vectors["features"])


def test_a_vit_backbone_gives_its_cls_token(image_dir, tmp_path, capsys):
    """A ViT backbone as the export writes one (vit-small, here tiny and untrained): the
    features are the layer-normed [CLS] token, what the probe reads."""
    from transformers import AutoImageProcessor, AutoModel, ViTConfig, ViTModel

    from megabatch.data_pipeline.read.transforms import ImageConfig
    from megabatch.trainer.export_hf import image_processor

    folder = tmp_path / "vit"
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)  # fmt: skip
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    image_processor(ImageConfig(size=16)).save_pretrained(folder)
    code, _, lines = _embed(capsys, folder, "--images", image_dir, "--out", tmp_path / "v.parquet")
    assert code == 0, lines
    keys, vectors, meta = _read(tmp_path / "v.parquet")
    assert meta["model_type"] == "vit" and meta["columns"]["features"]["dimension"] == 32
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    with torch.no_grad():
        pixels = processor(images=[Image.open(image_dir / k) for k in keys], return_tensors="pt")
        reference = AutoModel.from_pretrained(folder)(**pixels).last_hidden_state[:, 0].numpy()
    assert _max_diff(vectors["features"], reference) <= TOL * max(1.0, np.abs(reference).max())


# --------------------------------------------------------------------------- bad input
def _bad_cases(clip: Path, simclr: Path, tmp: Path) -> list[tuple[tuple, str]]:
    images = tmp / "only_text"
    images.mkdir()
    (images / "notes.txt").write_text("x")
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "x.jpg").write_bytes(b"not a jpeg")
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "caps.txt").write_text("a dog\n")
    (tmp / "no_shards").mkdir()
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text('{"model_type": "bert"}')
    no_onnx = tmp / "no_onnx"
    no_onnx.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (no_onnx / name).write_bytes((simclr / name).read_bytes())
    odd_task = tmp / "odd_task"
    shutil.copytree(no_onnx, odd_task)
    (odd_task / "manifest.json").write_text('{"task": "nope"}')
    good = ("--images", tmp / "ok")
    _image(tmp / "ok" / "a.png", (16, 16))
    return [
        ((tmp, *good), "is not an export folder (no config.json"),
        ((tmp / "bert", *good), "holds a 'bert' model, not an export of megabatch"),
        ((clip,), "give one of --shards, --images, --captions"),
        ((clip, *good, "--captions", tmp / "caps.txt"), "(got --images, --captions)"),
        ((clip, "--images", images), "no image files under it"),
        ((clip, "--images", tmp / "missing"), "no such folder"),
        ((clip, "--captions", tmp / "blank.txt"), "no captions in it"),
        ((clip, "--shards", tmp / "no_shards"), "no manifest.json and no .tar files"),
        ((clip, "--shards", tmp / "none_{0..3}.tar"), "matches no existing shard"),
        ((simclr, "--captions", tmp / "caps.txt"), "--captions needs a CLIP export"),
        ((no_onnx, *good, "--onnx"), "model.onnx is missing: export with --format onnx"),
        ((odd_task, *good), "names task 'nope', not one of clip, simclr, moco, byol"),
        ((clip, *good, "--batch-size", 0), "--batch-size must be >= 1, got 0"),
        ((clip, "--images", corrupt), "nothing embedded: every input of"),
    ]


def test_bad_input_is_one_line_exit_2_and_no_file(clip_export, simclr_export, tmp_path, capsys):
    out = tmp_path / "out" / "x.parquet"
    for argv, said in _bad_cases(clip_export, simclr_export, tmp_path):
        code, stdout, lines = _embed(capsys, *argv, "--out", out)
        errors = [line for line in lines if "warning" not in line]
        assert code == 2 and len(errors) == 1 and said in errors[0], (argv, lines)
        assert errors[0].startswith("megabatch embed: error: ") and stdout == ""
        assert not out.parent.exists() or list(out.parent.iterdir()) == [], argv
    code, _, lines = _embed(capsys, clip_export, "--images", tmp_path / "ok", "--out",
                            tmp_path / "caps.txt" / "x.parquet")  # fmt: skip
    assert code == 2 and lines == [f"megabatch embed: error: --out {tmp_path}/caps.txt/x.parquet: "
                                   f"cannot write in {tmp_path}/caps.txt"]  # fmt: skip
    code, _, lines = _embed(capsys, clip_export, "--images", tmp_path / "ok")
    assert code == 2 and lines == ["megabatch embed: error: --out FILE is required (the parquet "
                                   "file to write)"]  # fmt: skip


def test_an_existing_file_needs_overwrite(clip_export, image_dir, tmp_path, capsys):
    folder = clip_export
    out = tmp_path / "x.parquet"
    out.write_text("keep")
    stale = tmp_path / ".x.parquet.partial-99999"  # what an embed killed outright leaves
    stale.write_text("stale")
    code, _, lines = _embed(capsys, folder, "--images", image_dir, "--out", out)
    assert code == 2 and lines == [f"megabatch embed: error: {out} exists (pass --overwrite to "
                                   "replace it)"]  # fmt: skip
    assert out.read_text() == "keep"
    code, _, _ = _embed(capsys, folder, "--images", image_dir, "--out", out, "--overwrite")
    assert code == 0 and _read(out)[0] == IMAGE_KEYS
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_embed_cut_short_leaves_no_file(clip_export, image_dir, tmp_path, monkeypatch):
    from megabatch.trainer import embed as embed_module

    out = tmp_path / "out" / "x.parquet"
    encode, calls = embed_module._encode, []

    def interrupted(encoder, column, items):
        calls.append(column)
        if len(calls) == 2:  # the first batch is written: the partial file exists
            assert [p.name for p in out.parent.iterdir()][0].startswith(".x.parquet.partial-")
            raise KeyboardInterrupt
        return encode(encoder, column, items)

    monkeypatch.setattr(embed_module, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["embed", str(clip_export), "--images", str(image_dir), "--out", str(out),
              "--batch-size", "1"])  # fmt: skip
    assert list(out.parent.iterdir()) == []


def test_sigterm_removes_the_partial_file(clip_export, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of a dog\n" * 20000)
    out = tmp_path / "out.parquet"
    proc = subprocess.Popen([sys.executable, "-m", "megabatch.trainer.cli", "embed",
                             str(clip_export), "--captions", str(captions), "--out", str(out),
                             "--batch-size", "1"], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.parquet.partial-*")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt"]


# --------------------------------------------------------------------------- ONNX
def test_onnx_gives_transformers_vectors(clip_export, simclr_export, image_dir, data, tmp_path,
                                         capsys):  # fmt: skip
    cases = [(clip_export, "--shards", data / "val"), (clip_export, "--images", image_dir),
             (simclr_export, "--images", image_dir)]  # fmt: skip
    for i, (folder, option, source) in enumerate(cases):
        results = []
        for backend in ((), ("--onnx",)):
            out = tmp_path / f"{i}{''.join(backend)}.parquet"
            code, _, lines = _embed(capsys, folder, option, source, "--out", out, *backend)
            assert code == 0, lines
            results.append(_read(out))
        (keys, hf, _), (onnx_keys, onnx, meta) = results
        assert keys == onnx_keys and list(hf) == list(onnx) and meta["backend"] == "onnxruntime"
        for column in hf:
            scale = max(1.0, float(np.abs(hf[column]).max()))
            assert _max_diff(onnx[column], hf[column]) <= ONNX_TOL * scale, (option, column)


def test_an_onnx_only_export_embeds_with_onnx(zero2_run, image_dir, tmp_path, capsys):
    """`--format onnx` alone writes no transformers model: --onnx embeds with it, the
    default backend says what is missing and how to go on."""
    folder = _export(zero2_run, tmp_path / "onnx-only", formats="onnx")
    out = tmp_path / "onnx.parquet"
    code, _, lines = _embed(capsys, folder, "--images", image_dir, "--out", out, "--onnx")
    assert code == 0, lines
    keys, vectors, meta = _read(out)
    assert meta["task"] == "clip" and meta["backend"] == "onnxruntime"
    assert list(vectors) == ["image_embeds"] and len(keys) == len(vectors["image_embeds"])
    code, _, lines = _embed(capsys, folder, "--captions", image_dir / "missing.txt", "--out", out,
                            "--overwrite")  # fmt: skip
    assert code == 2 and len(lines) == 1 and "missing.txt" in lines[0], lines
    code, _, lines = _embed(capsys, folder, "--images", image_dir, "--out", tmp_path / "hf.parquet")
    assert code == 2 and len(lines) == 1, lines
    assert "holds no transformers model (exported with --format onnx): pass --onnx" in lines[0]
    assert not (tmp_path / "hf.parquet").exists()


# --------------------------------------------------------------------------- docs
def test_help_and_docs_agree():
    """Every option of `megabatch embed --help` is in docs/export.md's embed section, and
    the reverse."""
    import argparse

    from megabatch.trainer.embed import add_embed_command

    commands = argparse.ArgumentParser().add_subparsers()
    add_embed_command(commands)
    options = {o for a in commands.choices["embed"]._actions for o in a.option_strings}
    docs = (ROOT / "docs" / "export.md").read_text()
    section = docs.split("## Embedding with the export: megabatch embed")[1].split("\n## ")[0]
    said = set(re.findall(r"`(--[a-z-]+)", section)) - {"--format"}  # export's, for --onnx
    assert options - {"-h", "--help"} == said
