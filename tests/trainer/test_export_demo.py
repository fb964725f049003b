"""The demo model's export, end to end: a demo-sized CLIP run on the built-in digits
(the demo preset, shortened), exported; zero-shot classification of the held-out digits
from the export alone (transformers, and onnxruntime), in a process where megabatch
cannot be imported (zero_shot_consumer.py), gives the trainer's prediction for every
image and so exactly the top-1 `megabatch eval` reports for the same checkpoint; and an
export killed outright (SIGKILL) leaves no folder.

Exact, not close: the demo's 48 x 48 digits reach the model through the same PIL resize
in the trainer's loader and in the exported CLIPImageProcessor (docs/export.md,
"Preprocessing"), so the pixels are equal, and the embeddings differ by float32 rounding
only, far below the margins between classes of a trained model. Tolerances on the unit
vectors (image embeddings, class embeddings), as docs/export.md states them: 1e-5
through transformers (the same modules, other kernels and batch shapes: a few ulps),
1e-4 through onnxruntime (fused and reordered ops; what the export itself enforces).
"""

import ast
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

from tests.trainer.runs import ROOT, consume, env

CONSUMER = Path(__file__).with_name("zero_shot_consumer.py")
TOLERANCE = {"hf": 1e-5, "onnx": 1e-4}
STEPS = 60  # zero-shot top-1 about 0.28 on 10 classes: well above chance, ties unlikely

pytestmark = pytest.mark.slow


def _cli(*argv, timeout=200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", *map(str, argv)],
                          cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo preset on the digits, one rank, STEPS steps of 64 pairs, evaluated and
    checkpointed at the end."""
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer, captions_from_shards
    from megabatch.data_pipeline.write.demo import write_demo

    root = tmp_path_factory.mktemp("demo")
    digits = root / "digits"
    write_demo(digits)
    captions = list(captions_from_shards(str(digits / "train")))
    CaptionTokenizer.train(captions, vocab_size=1000).save(digits / "tokenizer.json")
    run = root / "run"
    proc = _cli("train", "preset=demo-clip", f"run_dir={run}", f"data.train={digits / 'train'}",
                f"data.val={digits / 'val'}", f"data.tokenizer={digits / 'tokenizer.json'}",
                "data.num_workers=0", "batch.accumulation_steps=1", "optim.warmup_steps=10",
                f"train.max_steps={STEPS}", f"train.eval_every={STEPS}",
                f"train.checkpoint_every_steps={STEPS}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _held_out(run: Path, inputs: Path) -> list[int]:
    """The held-out images as stored, in the order evaluation reads them (its loader's),
    with labels and the zero-shot files evaluation uses; returns the labels."""
    from megabatch.data_pipeline.read.loader import ShardLoader
    from megabatch.trainer.config import load_config
    from megabatch.trainer.data import loader_config
    from megabatch.trainer.eval_run import _zero_shot_files

    config = load_config(run / "config.yaml", [f"run_dir={run}"])
    loader = ShardLoader(loader_config(config, config.data.val, captions=False, evaluation=True))
    keys, labels = [], []
    for batch in loader:
        keys += batch.keys
        labels += [m["label"] for m in batch.meta]
    stored = {}
    for shard in sorted(Path(config.data.val).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                stored[f"{shard.name}#{member.name}"] = tar.extractfile(member).read()
    inputs.mkdir()
    for i, key in enumerate(keys[: config.data.eval_max_samples]):
        url, name = key.rsplit("#", 1)
        ((member, data),) = [(m, d) for m, d in stored.items()
                             if m.startswith(f"{Path(url).name}#{name}.") and m.endswith((".jpg", ".png"))]  # fmt: skip
        (inputs / f"{i:04d}{Path(member).suffix}").write_bytes(data)
    classnames, templates = _zero_shot_files(config)
    (inputs / "classnames.json").write_text(classnames.read_text())
    (inputs / "templates.json").write_text(templates.read_text())
    (inputs / "labels.json").write_text(json.dumps(labels[: config.data.eval_max_samples]))
    return labels


def _trainer_side(run: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Each held-out image's zero-shot class as evaluation computes it (its loader, its
    class embeddings), from the newest checkpoint's weights; and the unit vectors
    compared: image embeddings (N, D), class embeddings (C, D)."""
    import torch
    import torch.nn.functional as F

    from megabatch.trainer import evaluation
    from megabatch.trainer.config import load_config
    from megabatch.trainer.data import load_tokenizer
    from megabatch.trainer.eval_run import _encode, _zero_shot_files
    from megabatch.trainer.tasks import make_task
    from tests.trainer.runs import weights

    config = load_config(run / "config.yaml", [f"run_dir={run}"])
    tokenizer = load_tokenizer(config)
    task = make_task(config, torch.device("cpu"), 1, tokenizer)
    model = task.build_model()
    model.load_state_dict(weights(sorted((run / "checkpoints").glob("step*"))[-1]))
    model.eval()
    classnames, templates = (json.loads(p.read_text()) for p in _zero_shot_files(config))
    with torch.no_grad():
        images, _, _ = _encode(task, model, config.data.val, config, want_text=False)
        classes = evaluation.class_embeddings(lambda t, m: model.encode_text(t, m).float(),
                                              tokenizer, classnames, templates)  # fmt: skip
    images = F.normalize(images, dim=-1)
    return (images @ classes.T).argmax(dim=1).tolist(), images.numpy(), classes.numpy()


def _zero_shot(backend: str, folder: Path, inputs: Path, out: Path) -> dict:
    out.mkdir()
    proc = consume(CONSUMER, backend, folder, inputs, out, cwd=out)
    return {**json.loads(proc.stdout), "image_embeds": np.load(out / "image_embeds.npy"),
            "classes": np.load(out / "classes.npy")}  # fmt: skip


@pytest.fixture(scope="module")
def demo_export(demo_run) -> Path:
    folder = demo_run.parent / "export"
    exported = _cli("export", demo_run, "--out", folder, "--format", "hf,onnx")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stderr == ""  # nothing but DIR, on stdout
    return folder


def test_zero_shot_from_the_export_alone_equals_megabatch_eval(demo_run, demo_export, tmp_path):
    evaluated = _cli("eval", demo_run)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    reported = json.loads(evaluated.stdout)["zeroshot_top1"]
    assert reported > 0.2  # trained: chance is 0.1

    folder = demo_export
    labels = _held_out(demo_run, tmp_path / "inputs")
    predictions, image_embeds, classes = _trainer_side(demo_run)
    for backend in ("hf", "onnx"):
        result = _zero_shot(backend, folder, tmp_path / "inputs", tmp_path / backend)
        assert np.abs(result["image_embeds"] - image_embeds).max() <= TOLERANCE[backend]
        assert np.abs(result["classes"] - classes).max() <= TOLERANCE[backend]
        assert result["predictions"] == predictions, backend
        correct = round(result["top1"] * len(labels))
        assert correct == round(reported * len(labels)), (backend, result["top1"], reported)


def test_an_export_killed_outright_leaves_no_folder(demo_run, tmp_path):
    """SIGKILL while the files are written: DIR never appears, only the hidden partial
    folder stays, and the next export to DIR removes it."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "megabatch.trainer.cli", "export", str(demo_run),
               "--out", str(out), "--format", "hf,onnx"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    partial = tmp_path / f".out.partial-{proc.pid}"
    deadline = time.monotonic() + 60
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert partial.exists(), "the export never started writing"
    time.sleep(0.2)  # into the model files
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [partial.name]
    assert any(partial.rglob("*")), "killed before it wrote anything: the check is void"

    again = _cli("export", demo_run, "--out", out, "--format", "hf")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_readme_snippet_classifies_digits_from_the_export(demo_run, demo_export, tmp_path):
    """README.md's zero-shot snippet, as written but for its two paths, in a process where
    megabatch cannot be imported."""
    readme = (ROOT / "README.md").read_text()
    (snippet,) = [code for code in re.findall(r"```python\n(.*?)```", readme, re.S)
                  if "CLIPModel.from_pretrained" in code]  # fmt: skip
    shard = sorted((demo_run.parent / "digits" / "val").glob("*.tar"))[0]
    for path, ours in (("runs/demo-clip/export/step00000200", demo_export),
                       ("data/digits/val/00000.tar", shard)):  # fmt: skip
        assert f'"{path}"' in snippet
        snippet = snippet.replace(f'"{path}"', repr(str(ours)))
    script = tmp_path / "snippet.py"
    script.write_text("from blocked_imports import block\n\nblock('megabatch')\n" + snippet)
    shutil.copy(CONSUMER.parent / "blocked_imports.py", tmp_path)
    proc = consume(script, cwd=tmp_path)
    predicted, labels = (line.split(":", 1)[1] for line in proc.stdout.splitlines()[-2:])
    predicted, labels = ast.literal_eval(predicted.strip()), ast.literal_eval(labels.strip())
    assert len(predicted) == len(labels) == 10
    assert set(predicted) <= set(json.loads((shard.parent.parent / "classnames.json").read_text()))


def test_the_demo_command_ends_with_an_export_it_may_redo(demo_run, capsys):
    """`megabatch demo`'s last step (commands._export_demo): RUN/export/stepN, hf and
    ONNX, printed; a second demo on the same run replaces it."""
    from megabatch.trainer.commands import _export_demo

    for _ in range(2):
        assert _export_demo(demo_run) == 0
        out = capsys.readouterr().out
        (folder,) = (demo_run / "export").glob("step*")
        assert f"exported: {folder} (transformers and ONNX" in out
        assert (folder / "model.safetensors").is_file()
        assert (folder / "image_encoder" / "model.onnx").is_file()
