"""The built-in demo: scikit-learn's digits, split and captioned deterministically."""

import json

import numpy as np

from megabatch.data_pipeline.write.demo import (
    CAPTION_TEMPLATES,
    CLASSNAMES,
    DemoOptions,
    load_demo,
    write_demo,
)
from megabatch.data_pipeline.write.writer import ShardOptions
from tests.data_pipeline.helpers import folder_bytes, read_members

N_DIGITS = 1797


def test_split_is_disjoint_stratified_and_covers_every_digit():
    data = load_demo(DemoOptions(image_size=16))
    train, val = data.split_indices["train"], data.split_indices["val"]
    assert len(np.intersect1d(train, val)) == 0
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(N_DIGITS))
    for label in range(10):
        in_class = np.sum(data.labels == label)
        assert abs(np.sum(data.labels[val] == label) - 0.2 * in_class) <= 1
    # A different seed gives a different split of the same size.
    other = load_demo(DemoOptions(image_size=16, seed=1))
    assert len(other.split_indices["val"]) == len(val)
    assert not np.array_equal(other.split_indices["val"], val)


def test_captions_are_seeded_varied_and_name_the_digit():
    first, again = load_demo(DemoOptions()), load_demo(DemoOptions())
    assert first.captions == again.captions
    assert load_demo(DemoOptions(seed=7)).captions != first.captions
    assert len(CAPTION_TEMPLATES) >= 5
    used = {t for t in CAPTION_TEMPLATES for c in first.captions[:200] if _fits(t, c)}
    assert used == set(CAPTION_TEMPLATES)
    for caption, label in zip(first.captions, first.labels.tolist(), strict=True):
        assert CLASSNAMES[label] in caption or str(label) in caption.split()


def _fits(template: str, caption: str) -> bool:
    return any(template.format(word=w, numeral=n) == caption for n, w in enumerate(CLASSNAMES))


def test_write_demo_is_byte_for_byte_deterministic(tmp_path):
    options = ShardOptions(max_samples_per_shard=500)
    results = write_demo(tmp_path / "a", DemoOptions(image_size=16), options)
    write_demo(tmp_path / "b", DemoOptions(image_size=16), options)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")

    out = tmp_path / "a"
    assert json.loads((out / "classnames.json").read_text()) == list(CLASSNAMES)
    templates = json.loads((out / "templates.json").read_text())
    assert templates and all("{}" in t for t in templates)
    assert results["train"].total_samples + results["val"].total_samples == N_DIGITS
    assert results["val"].total_samples == 359
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert train["split"] == "train" and train["has_captions"] and not train["skipped"]
    assert [s["samples"] for s in train["shards"]] == [500, 500, 438]

    # Every sample's members, and its caption in both the .txt and the .json.
    members = dict(read_members(out / "val" / "00000.tar"))
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 359
    record = json.loads(members[f"{keys[0]}.json"])
    assert record["caption"] == members[f"{keys[0]}.txt"].decode()
    assert (record["width"], record["height"]) == (16, 16)
    assert record["label_name"] == CLASSNAMES[record["label"]]
    assert members[f"{keys[0]}.jpg"][:2] == b"\xff\xd8"
