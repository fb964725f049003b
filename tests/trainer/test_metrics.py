"""Step metrics: the JSON-lines sink that a resumed run appends to, and the progress
line a user watches."""

import json

from megabatch.trainer.metrics import JsonLinesSink, MetricsSink, progress_line


def test_json_lines_sink_appends_across_restarts(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"  # the folder is made on first use
    first: MetricsSink = JsonLinesSink(path)
    first.write(1, {"loss": 2.5})
    first.write(2, {"loss": 2.0})
    first.close()
    resumed = JsonLinesSink(path)  # a resumed run repeats step 2, then goes on
    resumed.write(2, {"loss": 1.9})
    resumed.write(3, {"loss": 1.5, "lr": 1e-3})
    resumed.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2, 3]
    assert all(isinstance(r["time"], float) for r in records)
    last_of_each_step = {r["step"]: r["loss"] for r in records}  # how readers take them
    assert last_of_each_step == {1: 2.5, 2: 1.9, 3: 1.5}
    assert records[-1]["lr"] == 1e-3


def test_each_write_is_on_disk_at_once(tmp_path):
    # A rank killed between steps loses no written step: every write is flushed.
    sink = JsonLinesSink(tmp_path / "metrics.jsonl")
    sink.write(7, {"loss": 1.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 7
    sink.close()


def test_progress_line():
    values = {"loss": 1.23456, "samples_per_s": 1234.4, "lr": 3e-4, "logit_scale": 14.2857,
              "data_wait_fraction": 0.126}  # fmt: skip
    line = progress_line(40, 100, values, eta_s=125.0)
    assert line == ("step 40/100  loss 1.2346  1234 samples/s  lr 3.00e-04  scale 14.29  "
                    "data wait 13%  ETA 2m05s")  # fmt: skip
