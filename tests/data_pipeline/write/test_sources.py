"""The four sources on tiny data made here: what they yield and what they refuse."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megabatch.data_pipeline.errors import DataError
from megabatch.data_pipeline.write.demo import CLASSNAMES, DemoOptions, DemoSource, load_demo
from megabatch.data_pipeline.write.sources import ImageFolderSource, TableSource
from tests.data_pipeline.helpers import make_caption_folder, save_image


def test_folder_with_captions_pairs_each_image_with_its_txt(tmp_path):
    root = make_caption_folder(tmp_path / "src", 5)
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"ignored: hidden")
    source = ImageFolderSource(root)
    assert source.has_captions
    assert list(source.ids()) == [
        "img00.jpg",
        "img02.webp",
        "img03.jpg",
        "img04.png",
        "sub/img01.png",
    ]
    samples = list(source)
    assert [s.caption for s in samples] == [f"caption number {i}" for i in (0, 2, 3, 4, 1)]
    assert samples[0].image == (root / "img00.jpg").read_bytes()
    assert "5 images with captions" in source.description


def test_folder_with_a_missing_caption_file_is_an_error_naming_it(tmp_path):
    root = make_caption_folder(tmp_path / "src", 4)
    (root / "img02.webp").with_suffix(".txt").unlink()
    with pytest.raises(DataError, match=r"1 of 4 images .* no caption file.*img02\.webp"):
        ImageFolderSource(root)


def test_images_only_ignores_captions(tmp_path):
    root = make_caption_folder(tmp_path / "src", 3)
    source = ImageFolderSource(root, captions=False)
    assert not source.has_captions
    assert [s.caption for s in source] == [None, None, None]


@pytest.mark.parametrize("captions", [True, False])
def test_folder_errors(tmp_path, captions):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope", captions=captions)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("a caption without an image")
    with pytest.raises(DataError, match="no images"):
        ImageFolderSource(tmp_path / "empty", captions=captions)


def _table_rows(tmp_path):
    images = [save_image(tmp_path / "imgs" / f"{i}.png", seed=i) for i in range(3)]
    # Relative to the table's folder, and one absolute.
    return [
        {"path": "imgs/0.png", "text": "a red square", "extra": 1},
        {"path": "imgs/1.png", "text": "a blue circle", "extra": 2},
        {"path": str(images[2]), "text": "a green line", "extra": 3},
    ]


def _write_table(tmp_path, rows, suffix):
    path = tmp_path / f"table{suffix}"
    if suffix == ".csv":
        lines = ["path,text,extra"] + [f"{r['path']},{r['text']},{r['extra']}" for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_table_source_reads_paths_and_captions(tmp_path, suffix):
    rows = _table_rows(tmp_path)
    source = TableSource(_write_table(tmp_path, rows, suffix), "path", "text")
    samples = list(source)
    assert [s.caption for s in samples] == ["a red square", "a blue circle", "a green line"]
    assert samples[1].image == (tmp_path / "imgs" / "1.png").read_bytes()
    assert [s.metadata for s in samples] == [{"row": 0}, {"row": 1}, {"row": 2}]
    assert source.ids()[0] == "imgs/0.png"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_table_unknown_column_names_it_and_lists_the_columns(tmp_path, suffix):
    table = _write_table(tmp_path, _table_rows(tmp_path), suffix)
    with pytest.raises(DataError, match=r"column 'img' not found .*'path', 'text'"):
        TableSource(table, "img", "text")
    with pytest.raises(DataError, match="column 'caption' not found"):
        TableSource(table, "path")


def test_table_missing_image_or_url_is_an_error(tmp_path):
    rows = _table_rows(tmp_path)
    rows[1]["path"] = "imgs/missing.png"
    with pytest.raises(DataError, match=r"1 of 3 images .* do not exist: imgs/missing\.png"):
        TableSource(_write_table(tmp_path, rows, ".jsonl"), "path", "text")
    rows[1]["path"] = "https://example.com/x.jpg"
    with pytest.raises(DataError, match="URLs"):
        TableSource(_write_table(tmp_path, rows, ".jsonl"), "path", "text")


def test_table_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TableSource(tmp_path / "nope.csv")
    (tmp_path / "t.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match="unknown format .xlsx"):
        TableSource(tmp_path / "t.xlsx")
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="no rows"):
        TableSource(tmp_path / "empty.csv")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n{"image": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        TableSource(tmp_path / "bad.jsonl")


def test_demo_source_yields_rgb_images_with_matching_captions():
    data = load_demo(DemoOptions(image_size=16))
    source = DemoSource(data, "val")
    sample = source.load(3)
    assert isinstance(sample.image, Image.Image)
    assert sample.image.mode == "RGB" and sample.image.size == (16, 16)
    label = sample.metadata["label"]
    assert sample.metadata["label_name"] == CLASSNAMES[label]
    assert CLASSNAMES[label] in sample.caption or str(label) in sample.caption
