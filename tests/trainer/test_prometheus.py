"""Every rank's /metrics (trainer/prometheus.py): the exposition that promtool accepts,
the values of a real run, rank 0's global values, the file_sd targets, and a port in use
said before training."""

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from megabatch.trainer.config import ConfigError, MetricsConfig, load_config
from megabatch.trainer.prometheus import (
    MetricsServer,
    PrometheusSink,
    withdraw_targets,
    write_targets,
)
from tests.trainer.runs import errors, overrides, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _value(text: str, series: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.split(" ")[0] == series]
    return float(line.rsplit(" ", 1)[1])


def _record(step, **kw):
    return {"loss": 2.0, "lr": 1e-3, "logit_scale": 14.0, "samples_per_s": 100.0,
            "step_time_s": 0.5, "data_wait_fraction": 0.1, "skipped_samples": 0.0,
            "nonfinite_steps": 0.0, "samples_seen": 64.0 * step, "logged_steps": 2.0,
            "data_wait_s": 0.1, "nonfinite_steps_total": 0.0, **kw}  # fmt: skip


@pytest.fixture
def sinks():
    """Rank 0's and rank 1's sinks, each on its own loopback port."""
    config = load_config(None, ["train.checkpoint_every_minutes=30", "train.max_steps=10"])
    made = []
    for rank in (0, 1):
        server = MetricsServer.start(MetricsConfig(port=_free_port()), local_rank=0)
        made.append(PrometheusSink(server, config, rank=rank, world_size=2))
    yield made
    for sink in made:
        sink.close()


def test_global_values_from_rank_0_per_rank_values_from_every_rank(sinks):
    rank0, rank1 = sinks
    for sink in sinks:
        sink.write(2, _record(2, **{"skipped_samples/corrupt_image": 3.0}))
        sink.write(4, _record(4, loss=float("nan"), nonfinite_steps_total=1.0,
                              **{"skipped_samples/corrupt_image": 5.0}))  # fmt: skip
    rank0.write(4, {"eval/zeroshot_top1": 0.75})
    rank0.write(4, {"checkpoint/duration_s": 1.5, "checkpoint/bytes": 1e6, "checkpoint/time": 1e9})
    rank0.write(4, {"checkpoint/failed": 1.0})
    zero, one = _scrape(rank0.server.port), _scrape(rank1.server.port)
    assert _value(zero, "megabatch_step") == 4
    assert _value(zero, "megabatch_max_steps") == 10
    assert _value(zero, "megabatch_samples_total") == 256  # a counter of the run's total
    assert math.isnan(_value(zero, "megabatch_loss"))
    assert _value(zero, "megabatch_nonfinite_steps_total") == 1
    assert _value(zero, 'megabatch_eval_score{metric="zeroshot_top1"}') == 0.75
    assert _value(zero, "megabatch_checkpoint_size_bytes") == 1e6
    assert _value(zero, "megabatch_last_checkpoint_timestamp_seconds") == 1e9
    assert _value(zero, "megabatch_checkpoint_failures_total") == 1
    assert _value(zero, "megabatch_checkpoint_interval_seconds") == 1800
    assert 'megabatch_run_info{global_batch="128",model="tiny",task="clip",world_size="2"}' in zero
    for text, rank in ((zero, "0"), (one, "1")):
        # 2 logging intervals of 2 steps each, observed at their mean step time.
        assert _value(text, f'megabatch_step_duration_seconds_count{{rank="{rank}"}}') == 4
        assert _value(text, f'megabatch_step_duration_seconds_sum{{rank="{rank}"}}') == 2.0
        assert _value(text, f'megabatch_data_wait_seconds_total{{rank="{rank}"}}') == 0.2
        assert _value(text, f'megabatch_skipped_samples_total{{rank="{rank}",reason="corrupt_image"}}') == 5  # fmt: skip
        assert (
            time.time() - _value(text, f'megabatch_last_step_timestamp_seconds{{rank="{rank}"}}')
            < 60
        )
        assert "megabatch_build_info{" in text and "process_resident_memory_bytes" in text
    # Global values only where a sum over targets counts them once.
    assert "megabatch_step " not in one and "megabatch_samples_total" not in one


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_finds_no_problem_in_the_exposition(sinks):
    for sink in sinks:
        sink.write(2, _record(2, **{"skipped_samples/bad_shard": 1.0}))
        text = _scrape(sink.server.port)
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True, timeout=30)  # fmt: skip
        assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_a_port_in_use_is_one_line_naming_the_key():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            MetricsServer.start(MetricsConfig(port=port - 1), local_rank=1)
    message = str(caught.value)
    assert message.startswith(f"metrics.port: cannot serve /metrics on 127.0.0.1:{port} ")
    assert "local rank 1" in message and "\n" not in message


def test_a_training_run_with_its_port_in_use_stops_before_training(data, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = tmp_path / "run"
        proc = train(overrides(data, run, **{"metrics.prometheus": "true", "metrics.port": port}))
    assert proc.returncode == 2
    assert errors(proc.stderr) == [f"megabatch train: error: metrics.port: cannot serve /metrics on "
                            f"127.0.0.1:{port} (metrics.port {port} + local rank 0): "
                            "Address already in use"]  # fmt: skip
    assert not (run / "checkpoints").exists()


def test_targets_file_lists_every_rank_and_is_withdrawn(tmp_path):
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    path = write_targets(run_dir, "myrun", [("nodeb", 9432, 1, "b"), ("nodea", 9431, 0, "a")])
    assert json.loads(path.read_text()) == [
        {"targets": ["nodea:9431"], "labels": {"run": "myrun", "rank": "0", "node": "a"}},
        {"targets": ["nodeb:9432"], "labels": {"run": "myrun", "rank": "1", "node": "b"}},
    ]
    # Beside the run, a relative link that a file_sd pattern's last segment can match.
    link = tmp_path / "prometheus-targets-myrun.json"
    assert os.readlink(link) == "myrun/prometheus-targets.json"
    assert json.loads(link.read_text()) == json.loads(path.read_text())
    write_targets(run_dir, "myrun", [("nodea", 9431, 0, "a")])  # a restart: rewritten
    assert len(json.loads(link.read_text())) == 1
    withdraw_targets(run_dir)
    assert json.loads(link.read_text()) == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "myrun",
        "prometheus-targets-myrun.json",
        "prometheus-targets.json",
    ]  # no temporaries


@pytest.mark.parametrize(("override", "message"), [
    ("metrics.port=0", "metrics.port must be in [1, 65280], got 0"),
    ("metrics.port=65535", "metrics.port must be in [1, 65280], got 65535"),
    ("metrics.address=' '", "metrics.address must not be empty"),
    ("metrics.linger_s=-1", "metrics.linger_s must be in [0, 3600], got -1"),
])  # fmt: skip
def test_metrics_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override]).validate()


def test_totals_that_go_back_never_raise_nor_lower_a_counter(sinks):
    rank0, _ = sinks
    rank0.write(2, _record(2, **{"skipped_samples/bad_shard": 4.0}))
    rank0.write(4, _record(1, **{"skipped_samples/bad_shard": 1.0}))  # lower totals
    rank0.write(6, _record(3, **{"skipped_samples/bad_shard": 6.0}))
    text = _scrape(rank0.server.port)
    # Counted from the highest total seen: 4, then 6 (not 4 + 5 after the dip).
    assert _value(text, 'megabatch_skipped_samples_total{rank="0",reason="bad_shard"}') == 6
    assert _value(text, "megabatch_samples_total") == 192


def test_a_hung_scraper_holds_neither_the_loop_nor_other_scrapes(sinks):
    rank0, _ = sinks
    with socket.create_connection(("127.0.0.1", rank0.server.port)) as hung:
        hung.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never finishes its request
        with socket.create_connection(("127.0.0.1", rank0.server.port)) as gone:
            gone.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")  # leaves unread
        started = time.monotonic()
        rank0.write(6, _record(6))
        assert time.monotonic() - started < 0.5
        assert _value(_scrape(rank0.server.port), "megabatch_step") == 6
