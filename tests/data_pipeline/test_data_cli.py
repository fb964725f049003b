"""`megabatch data write` and `megabatch data inspect`, in process and as the console
script; bad input is one line on stderr, exit status 2 and nothing left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megabatch.trainer.cli import main
from tests.data_pipeline.helpers import make_caption_folder, save_image, write_tar

SCRIPT = Path(sys.executable).parent / "megabatch"


def test_data_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "write" in out and "inspect" in out


def test_console_script_data_help():
    proc = subprocess.run(
        [str(SCRIPT), "data", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "write" in proc.stdout and "inspect" in proc.stdout


def test_write_demo_then_inspect(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["data", "write", "--from", "demo", "--out", str(out), "--image-size", "16"]
    assert main([*argv, "--max-samples-per-shard", "1000"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'train'}: 1438 samples in 2 shards" in printed
    assert f"{out / 'val'}: 359 samples in 1 shards" in printed
    assert json.loads((out / "classnames.json").read_text())[7] == "seven"

    assert main(["data", "inspect", str(out / "train")]) == 0
    assert "2 shards, 1438 samples (captions expected): ok" in capsys.readouterr().out
    # The same command again finds the work done.
    assert main([*argv, "--max-samples-per-shard", "1000"]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["folder", "table", "images"])
def test_write_each_source_then_inspect_as_json(tmp_path, capsys, source):
    root = make_caption_folder(tmp_path / "src", 5, suffixes=(".jpg", ".png"))
    if source == "table":
        table = tmp_path / "pairs.jsonl"
        table.write_text(
            "".join(
                json.dumps({"file": f"src/{p.relative_to(root)}", "text": f"pair {i}"}) + "\n"
                for i, p in enumerate(sorted(root.rglob("*.jpg")))
            )
        )
        extra = ["--input", str(table), "--image-column", "file", "--caption-column", "text"]
    else:
        extra = ["--input", str(root)]
    out = tmp_path / "out"
    argv = ["data", "write", "--from", source, "--out", str(out), "--max-bytes-per-shard", "20k"]
    assert main([*argv, *extra]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["total_samples"] == (3 if source == "table" else 5)
    assert report["captions_expected"] == (source != "images")
    assert all(shard["samples"] >= 1 for shard in report["shards"])


def test_inspect_reports_problems_with_exit_status_1(tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(
        folder / "00000.tar", [("000000000.jpg", b"\xff\xd8\xff garbage"), ("000000000.txt", b"x")]
    )
    assert main(["data", "inspect", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "1 problem\n" in out and "00000.tar [000000000]: corrupt_image" in out


def _table_with_columns(tmp_path):
    save_image(tmp_path / "a.png")
    table = tmp_path / "t.csv"
    table.write_text("path,text\na.png,a caption\n")
    return table


def _folder_missing_a_caption(tmp_path):
    root = make_caption_folder(tmp_path / "src", 3)
    (root / "img02.txt").unlink()
    return root


@pytest.mark.parametrize(
    "case, args, named",
    [
        ("missing input", lambda t: ["--from", "folder", "--input", str(t / "nope")], "nope"),
        ("no --input", lambda t: ["--from", "images"], "--input is required"),
        (
            "unknown column",
            lambda t: [
                "--from",
                "table",
                "--input",
                str(_table_with_columns(t)),
                "--image-column",
                "img",
            ],
            "column 'img' not found",
        ),
        (
            "empty source",
            lambda t: ["--from", "images", "--input", str(_empty_folder(t))],
            "no images",
        ),
        (
            "missing caption",
            lambda t: ["--from", "folder", "--input", str(_folder_missing_a_caption(t))],
            "img02.webp",
        ),
        ("bad option", lambda t: ["--from", "demo", "--jpeg-quality", "0"], "jpeg_quality"),
        (
            "column without table",
            lambda t: ["--from", "demo", "--image-column", "x"],
            "only applies",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case, args, named):
    out = tmp_path / "out"
    code = main(["data", "write", *args(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, case
    assert len(err.strip().splitlines()) == 1 and named in err, err
    assert err.startswith("megabatch data write: error: ")
    assert not out.exists()


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize("out_name", ["a_file", "a_file/sub"])
def test_unwritable_output_is_one_line_exit_2(tmp_path, capsys, out_name):
    (tmp_path / "a_file").write_text("not a folder")
    root = make_caption_folder(tmp_path / "src", 2)
    code = main(
        [
            "data",
            "write",
            "--from",
            "folder",
            "--input",
            str(root),
            "--out",
            str(tmp_path / out_name),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "a_file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "src"]
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("manifest.json"))


def test_inspect_of_nothing_is_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no such file or folder" in err


@pytest.mark.parametrize(
    "name, table, line",
    [
        (
            "t.jsonl",
            b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "caf\xe9"}\n',
            2,
        ),
        ("t.csv", b"image,caption\na.png,ok\na.png,ok\na.png,caf\xe9\n", 4),
        ("t.tsv", b"image\tcaption\n\xff.png\tok\n", 2),
    ],
    ids=["jsonl", "csv", "tsv"],
)
def test_a_table_that_is_not_utf8_is_one_line_exit_2(tmp_path, capsys, name, table, line):
    save_image(tmp_path / "a.png")
    (tmp_path / name).write_bytes(table)
    out = tmp_path / "out"
    argv = ["data", "write", "--from", "table", "--input", str(tmp_path / name), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / name}:{line}: not UTF-8" in err
    assert not out.exists()
