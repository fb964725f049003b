"""The input pipeline benchmark's stages (not its timings): the decode stage decodes what
the loader decodes, the way the loader decodes it."""

import pytest

from megabatch.data_pipeline import benchmark
from megabatch.data_pipeline.read.transforms import ImageConfig
from tests.data_pipeline.fake_shards import write_shards


@pytest.mark.parametrize("decoder", ["pil", "auto"])
def test_decode_stage_uses_the_loaders_decoding(tmp_path, monkeypatch, decoder):
    write_shards(tmp_path, 10, per_shard=5)  # 24-pixel-high JPEGs, some wider
    calls = []
    for name in ("decode_image", "jpeg_into"):
        real = getattr(benchmark, name)
        monkeypatch.setattr(benchmark, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))  # fmt: skip
    stage = benchmark._RawStage(str(tmp_path), True, 4, ImageConfig(size=24, decoder=decoder))
    counts = iter(stage)
    assert [next(counts) for _ in range(3)] == [4, 4, 2]  # one epoch, then the next begins
    assert calls.count("decode_image") + calls.count("jpeg_into") >= 10
    if decoder == "pil":
        assert calls == ["decode_image"] * 10


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--stages", "decode,warp", "--shards", "nowhere"])
    assert "unknown stages warp" in capsys.readouterr().err


def test_rows_are_measured_in_rounds_and_reported_as_medians(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", 6, per_shard=3)
    monkeypatch.chdir(tmp_path)
    calls = []
    fake = {("decode", 1): [100.0, 300.0, 200.0], ("clip", 1): [90.0, 150.0, 170.0]}

    def measure(stage, workers, args, tokenizer):
        calls.append(stage)
        return fake[stage, workers][sum(c == stage for c in calls) - 1]

    monkeypatch.setattr(benchmark, "_measure", measure)
    out = tmp_path / "bench.md"
    args = ["--shards", str(tmp_path / "shards"), "--stages", "decode,clip", "--workers", "1"]
    assert benchmark.main([*args, "--output", str(out)]) == 0
    assert calls == ["decode", "clip"] * 3  # rounds over all rows, not row after row
    text = out.read_text()
    assert "| decode | 1 | 200 | - | - | 100, 300, 200 |" in text
    assert "| clip | 1 | 150 | 0.75 | - | 90, 150, 170 |" in text


def test_the_outputs_measurements_section_is_kept(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", 6, per_shard=3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "_measure", lambda stage, workers, args, tokenizer: 100.0)
    out = tmp_path / "bench.md"
    notes = f"\n{benchmark.NOTES_HEADING}\n\nMeasured by hand: 6 us a sample.\n"
    out.write_text("# Input pipeline benchmark\n\nold table\n" + notes)
    args = ["--shards", str(tmp_path / "shards"), "--stages", "decode", "--workers", "1"]
    assert benchmark.main([*args, "--repeat", "1", "--output", str(out)]) == 0
    text = out.read_text()
    assert "old table" not in text and "| decode | 1 | 100 |" in text
    assert text.endswith(notes)


def test_the_loader_stages_configs_come_from_the_arguments():
    args = benchmark.argparse.Namespace(shards="s", crop=224, load_size=256, decoder="pil",
                                        batch_size=64)  # fmt: skip
    clip = benchmark._loader_config("clip", 2, args)
    assert (clip.captions, clip.num_workers, clip.batch_size) == (True, 2, 64)
    assert clip.resampled and not clip.pin_memory
    assert (clip.image.size, clip.image.load_size, clip.image.decoder) == (224, 256, "pil")
    assert benchmark._loader_config("clip-resize", 1, args).image.load_size == 224
    assert not benchmark._loader_config("simclr-views", 1, args).captions
