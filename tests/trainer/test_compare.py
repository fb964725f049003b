"""``megabatch compare``: its rows come from the task registry and the presets, the
baselines go through a run's own evaluation, the targets are checked with their margins
into an atomically written table, bad input is one line (exit 2), and one tiny comparison
runs end to end and is reused, not retrained, on a rerun with --reuse."""

import json
import shutil

import pytest
import torch

from megabatch.data_pipeline.read.loader import ShardLoader
from megabatch.data_pipeline.read.transforms import device_preprocess
from megabatch.data_pipeline.write.demo import DemoOptions, write_demo
from megabatch.trainer import config as config_module
from megabatch.trainer.cli import main
from megabatch.trainer.compare import _reusable, discover, label, plan, select
from megabatch.trainer.compare_baselines import (
    RawPixels,
    random_backbone,
    raw_pixels,
    untrained_model,
)
from megabatch.trainer.compare_table import Provenance, Row, check_targets, render, write_table
from megabatch.trainer.config import load_config
from megabatch.trainer.data import loader_config
from megabatch.trainer.tasks import TASKS, SimCLRTask


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo digits at 16 px (the real split: 1,438 training, 359 held out)."""
    folder = tmp_path_factory.mktemp("digits")
    write_demo(folder, DemoOptions(image_size=16))
    return folder


@pytest.fixture
def small(digits):
    """Overrides that make every row and baseline tiny: 16 px, 256 samples of each split
    evaluated, micro-batches of 16, no checkpoint before the end."""
    return [f"data.train={digits / 'train'}", f"data.val={digits / 'val'}",
            "model.image_size=16", "data.load_size=16", "data.num_workers=0",
            "data.eval_max_samples=256", "batch.micro_batch_size=16",
            "batch.accumulation_steps=1", "optim.warmup_steps=1",
            "train.checkpoint_every_steps=null", "train.log_every=1"]  # fmt: skip


def _cli(capsys, argv):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


# ------------------------------------------------------------------ the rows
def test_methods_come_from_the_registry_and_its_presets(monkeypatch, tmp_path, capsys):
    presets = tmp_path / "presets"
    presets.mkdir()
    for name in ("demo-simclr", "demo-clip"):
        shutil.copy(config_module.PRESETS_DIR / f"{name}.yaml", presets)
    (presets / "demo-clip-siglip.yaml").write_text(
        (presets / "demo-clip.yaml").read_text() + "loss:\n  name: siglip\n"
    )
    # A new image method: registered, with a demo preset. Another without one: no row.
    shutil.copy(presets / "demo-simclr.yaml", presets / "demo-newmethod.yaml")
    monkeypatch.setattr(config_module, "PRESETS_DIR", presets)
    monkeypatch.setitem(TASKS, "newmethod", SimCLRTask)
    monkeypatch.setitem(TASKS, "nopreset", SimCLRTask)

    rows = discover()
    # Image methods first (registry order, each followed by its variants), then CLIP's.
    assert [m.name for m in rows] == ["simclr", "simclr-margin", "newmethod", "clip",
                                      "clip-siglip"]  # fmt: skip
    margin = next(m for m in rows if m.name == "simclr-margin")
    assert (margin.preset, margin.overrides) == ("demo-simclr", ("loss.name=margin",))
    configs = {p.method.name: p.config for p in plan(rows, tmp_path / "runs", None, [])}
    assert label(configs["simclr-margin"]) == "SimCLR, margin loss"
    assert label(configs["clip"]) == "CLIP, softmax loss"
    assert label(configs["clip-siglip"]) == "CLIP, SigLIP loss"
    assert configs["clip-siglip"].train.eval_every is None  # the final evaluation only
    assert configs["simclr"].run_dir == str(tmp_path / "runs" / "simclr")
    assert [m.name for m in select(rows, "clip-siglip,simclr")] == ["simclr", "clip-siglip"]

    status, out, _ = _cli(capsys, ["compare", "--list"])
    assert status == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [m.name for m in rows]
    assert "simclr-margin\tdemo-simclr\tloss.name=margin\tSimCLR, margin loss" in out


# ------------------------------------------------------------------ bad input
def test_unknown_method_is_one_line(capsys):
    status, _, err = _cli(capsys, ["compare", "--methods", "simclr,nope"])
    assert status == 2
    assert len(err) == 1 and err[0].startswith("megabatch compare: error: unknown method 'nope'")
    assert "choose from simclr, simclr-margin" in err[0]


def test_missing_data_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/digits here
    out = tmp_path / "methods.md"
    status, _, err = _cli(capsys, ["compare", "--methods", "simclr", "--out", str(out)])
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("megabatch compare: error: simclr (preset demo-simclr): data.train: "
                             "no such file or folder: data/digits/train")  # fmt: skip
    assert "megabatch data write --from demo" in err[0]
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_a_folder_compare_did_not_make_is_refused(small, tmp_path, capsys):
    mine = tmp_path / "runs" / "simclr"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my run")
    status, _, err = _cli(capsys, ["compare", "--methods", "simclr", "--runs",
                                   str(tmp_path / "runs"), *small])  # fmt: skip
    assert status == 2 and len(err) == 1, err
    assert "was not made by megabatch compare (no compare.json)" in err[0]
    assert (mine / "notes.txt").read_text() == "my run"


# ------------------------------------------------------------------ the baselines
def test_raw_pixels_are_the_models_input_flattened(small):
    config = load_config(None, ["preset=demo-simclr", *small])
    batch = next(iter(ShardLoader(loader_config(config, config.data.val, captions=False,
                                                evaluation=True))))  # fmt: skip
    features = RawPixels(config).image_features(torch.nn.Identity(), batch)
    assert features.shape == (len(batch), 3 * 16 * 16)
    assert torch.equal(
        features, device_preprocess(batch.images, RawPixels(config).image).flatten(1)
    )
    results = raw_pixels(config)
    # The digits are nearly linearly separable in their pixels (chance: 0.1).
    assert results["linear_probe_top1"] > 0.8 and results["knn_top1"] > 0.8


def test_random_backbone_is_the_runs_untrained_model(small):
    config = load_config(None, ["preset=demo-simclr", *small])
    _, first = untrained_model(config)
    _, again = untrained_model(config)
    _, other = untrained_model(load_config(None, ["preset=demo-simclr", "seed=1", *small]))
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name  # the seed decides it
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())
    results = random_backbone(config)
    assert set(results) == {"linear_probe_top1", "knn_top1"}
    assert 0.1 < results["linear_probe_top1"] <= 1.0


# ------------------------------------------------------------------ targets and table
def _row(name, kind, label=None, **results):
    return Row(name, label or name, kind, results=results)


def test_targets_say_met_not_met_and_not_measured_with_margins():
    rows = [
        _row("raw-pixels", "baseline", linear_probe_top1=0.961),
        _row("random-backbone", "baseline", linear_probe_top1=0.936),
        _row("simclr", "image", "SimCLR", linear_probe_top1=0.964),
        _row("simclr-margin", "image", "SimCLR, margin loss", linear_probe_top1=0.930),
        Row("moco", "MoCo v3", "image", note="failed: exit status 1"),
        _row("byol", "image", "BYOL", linear_probe_top1=0.961),  # equal: at or above
        _row("clip", "caption", zeroshot_top1=0.914),
        _row("clip-siglip", "caption", zeroshot_top1=0.895),
    ]
    found = {t.text: (t.met, t.detail) for t in check_targets(rows)}
    assert found["SimCLR above the random backbone (linear probe)"] == (
        True, "0.964 vs 0.936: +2.8 points")  # fmt: skip
    assert found["SimCLR, margin loss above the random backbone (linear probe)"] == (
        False, "0.930 vs 0.936: -0.6 points")  # fmt: skip
    assert found["MoCo v3 above the random backbone (linear probe)"] == (
        None, "failed: exit status 1")  # fmt: skip
    assert found["SimCLR at or above raw pixels (linear probe)"] == (
        True,
        "0.964 vs 0.961: +0.3 points",
    )
    assert found["BYOL at or above raw pixels (linear probe)"][0] is True
    siglip = "CLIP with the SigLIP loss within 2 points of the softmax loss (zero-shot top-1)"
    assert found[siglip] == (True, "0.895 vs 0.914: -1.9 points (limit -2.0)")

    rows[-1].results["zeroshot_top1"] = 0.890
    assert {t.text: t.met for t in check_targets(rows)}[siglip] is False
    partial = check_targets([r for r in rows if r.name not in ("byol", "clip-siglip")])
    assert {t.text: (t.met, t.detail) for t in partial}[siglip] == (None, "no clip-siglip row")
    assert ("byol at or above raw pixels (linear probe)", None, "no byol row") in [
        (t.text, t.met, t.detail) for t in partial
    ]


def test_table_has_every_row_and_target_and_is_replaced_whole(tmp_path):
    rows = [
        _row("raw-pixels", "baseline", "raw pixels", linear_probe_top1=0.961, knn_top1=0.975),
        _row("random-backbone", "baseline", "random backbone", linear_probe_top1=0.936),
        Row("simclr", "SimCLR", "image", {"linear_probe_top1": 0.964, "knn_top1": 0.953},
            steps=300, global_batch=512, wall_s=311.4, command="megabatch launch train x"),
        Row("clip", "CLIP, softmax loss", "caption", {"zeroshot_top1": 0.914}, steps=200,
            global_batch=256, wall_s=59, note="reused: trained 2026-12-01"),
    ]  # fmt: skip
    provenance = Provenance("megabatch compare --methods simclr,clip", "2026-12-07 10:00 UTC",
                            "x86_64, 2 cores", 2, (1.9, 2.2))  # fmt: skip
    text = render(rows, check_targets(rows), provenance)
    assert (
        "Written by `megabatch compare --methods simclr,clip` on 2026-12-07 10:00 UTC, "
        "x86_64, 2 cores; load average 1.9 when it started, 2.2 when it ended." in text
    )
    assert "| raw pixels | 0.961 | 0.975 | — | — | — | — |" in text
    assert "| SimCLR | 0.964 | 0.953 | — | 300 | 512 | 5 min 11 s |" in text
    assert (
        "| CLIP, softmax loss (reused: trained 2026-12-01) | — | — | 0.914 | 200 | 256 | 59 s |"
        in text
    )
    assert (
        "- met: SimCLR above the random backbone (linear probe): 0.964 vs 0.936: +2.8 points"
        in text
    )
    assert "- not measured: moco at or above raw pixels (linear probe): no moco row" in text
    assert "- SimCLR: `megabatch launch train x`" in text

    out = tmp_path / "docs" / "methods.md"
    out.parent.mkdir()
    out.write_text("old table\n")
    write_table(out, text)
    assert out.read_text() == text
    assert [p.name for p in out.parent.iterdir()] == ["methods.md"]  # no partial left


# ------------------------------------------------------------------ end to end
def test_compare_trains_evaluates_writes_and_reuses(small, tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "methods.md"
    argv = ["compare", "--methods", "simclr", "--steps", "1", "--ranks", "1", "--runs", str(runs),
            "--out", str(out), *small]  # fmt: skip
    # In this process (the ranks are a `megabatch launch` of their own, as for a user).
    status, _, err = _cli(capsys, argv)
    assert status == 0, err[-20:]
    table = out.read_text()
    row = next(line for line in table.splitlines() if line.startswith("| SimCLR, NT-Xent loss |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0.1 and float(cells[2]) > 0.1  # linear probe, kNN
    assert cells[3:6] == ["—", "1", "16"]  # no zero-shot; 1 step of 16 x 1 x 1 rank
    assert "| raw pixels (768 values) |" in table and "| random backbone (tiny-resnet" in table
    assert "- met: " in table or "- **not met**: " in table
    record = json.loads((runs / "simclr" / "compare.json").read_text())
    assert record["exit_status"] == 0 and record["results"]["step"] == 1
    assert record["results"] == json.loads((runs / "simclr" / "results.json").read_text())

    # The same config again, with --reuse: the finished run is taken, not retrained.
    status, _, err = _cli(capsys, [*argv, "--reuse"])
    assert status == 0, err
    assert json.loads((runs / "simclr" / "compare.json").read_text()) == record
    assert f"| SimCLR, NT-Xent loss (reused: trained {record['started']}) | {cells[1]} |" in (
        out.read_text()
    )
    # Another budget or world size is another run.
    (planned,) = plan(select(discover(), "simclr"), runs, 2, small)
    assert not _reusable(record, planned.config, 1)
    (planned,) = plan(select(discover(), "simclr"), runs, 1, small)
    assert _reusable(record, planned.config, 1) and not _reusable(record, planned.config, 2)
