"""megabatch data tokenizer: trains on the shards' captions, refuses bad input cleanly."""

import pytest

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.trainer.cli import main
from tests.data_pipeline.fake_shards import write_shards


def test_trains_and_saves_a_loadable_tokenizer(tmp_path, capsys):
    write_shards(tmp_path / "shards", 40, per_shard=10)
    out = tmp_path / "tokenizer.json"
    assert main(["data", "tokenizer", str(tmp_path / "shards"), "--out", str(out),
                 "--vocab-size", "320"]) == 0  # fmt: skip
    assert "from 40 captions" in capsys.readouterr().out
    tok = CaptionTokenizer.load(out, context_length=16)
    ids, mask = tok(["a photo of sample 7"])
    assert tok.decode(ids[0]) == "a photo of sample 7"


@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such/shards"], "no such file or folder"),
        (["SHARDS", "--vocab-size", "10"], "--vocab-size must be at least 300"),
        (["SHARDS", "--out", "/no/such/dir/tok.json"], "no such folder for --out"),
        (["EMPTY"], "no captions"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    write_shards(tmp_path / "shards", 10, per_shard=10)
    write_shards(tmp_path / "empty", 10, per_shard=10, no_caption=frozenset(range(10)))
    out = tmp_path / "tokenizer.json"
    args = [{"SHARDS": str(tmp_path / "shards"), "EMPTY": str(tmp_path / "empty")}.get(a, a)
            for a in args]  # fmt: skip
    if "--out" not in args:
        args += ["--out", str(out)]
    assert main(["data", "tokenizer", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
