"""What Prometheus metrics cost a training step: the sink's work per logging step, the
rendering a scrape costs (on the server's thread, not the loop's), and whole runs with
metrics off and on, alternated. Prints the table and writes docs/benchmarks-monitoring.md.

    python -m megabatch.trainer.bench_metrics            # make bench-metrics
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from megabatch.trainer.config import MetricsConfig, load_config
from megabatch.trainer.prometheus import MetricsServer, PrometheusSink


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sink_costs(writes: int) -> tuple[float, float]:
    """(median µs of PrometheusSink.write for one logging step, median µs to render one
    scrape), rank 0 (which publishes the most)."""
    from prometheus_client import generate_latest

    config = load_config(None, ["train.checkpoint_every_minutes=30"])
    sink = PrometheusSink(MetricsServer.start(MetricsConfig(port=_free_port()), 0), config, 0, 1)
    values = {"loss": 2.0, "lr": 1e-3, "logit_scale": 14.0, "samples_per_s": 100.0,
              "step_time_s": 0.5, "data_wait_fraction": 0.1, "skipped_samples": 3.0,
              "nonfinite_steps": 0.0, "samples_seen": 0.0, "logged_steps": 1.0,
              "data_wait_s": 0.01, "nonfinite_steps_total": 0.0,
              "skipped_samples/corrupt_image": 3.0}  # fmt: skip
    write, render = [], []
    for i in range(writes):
        values["samples_seen"] = 256.0 * i
        t0 = time.perf_counter()
        sink.write(i, values)
        write.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate_latest(sink.server.registry)
        render.append(time.perf_counter() - t0)
    sink.close()
    return 1e6 * statistics.median(write), 1e6 * statistics.median(render)


def run_step_time(run: Path, prometheus: bool, steps: int) -> float:
    """Median step_time_s of one demo run's logged steps (every step logged: the sink's
    worst case)."""
    port = _free_port()
    overrides = [f"run_dir={run}", f"train.max_steps={steps}", "train.log_every=1",
                 "train.checkpoint_every_steps=null", "train.checkpoint_every_minutes=null",
                 "train.eval_every=null", "data.val=null",
                 f"metrics.prometheus={str(prometheus).lower()}", f"metrics.port={port}"]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = threading.Event()
    if prometheus:  # a scraper 15x as eager as Prometheus's default interval
        threading.Thread(target=_scrape_every_second, args=(port, done), daemon=True).start()
    try:
        proc = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", "train",
                               "preset=demo-clip", *overrides], env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
    finally:
        done.set()
    if proc.returncode != 0:
        raise SystemExit(f"bench_metrics: a run failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "step_time_s" in r][2:]  # warm-up out
    return statistics.median(times)


def _scrape_every_second(port: int, done: threading.Event) -> None:
    while not done.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                r.read()
        except OSError:
            pass  # not up yet, or already gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megabatch.trainer.bench_metrics",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--pairs", type=int, default=3, help="off/on run pairs (default 3)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-monitoring.md"))
    args = parser.parse_args(argv)
    if not Path("data/digits/train/manifest.json").is_file():
        raise SystemExit("bench_metrics: no demo data in data/digits (run `megabatch demo` "
                         "or `make bench-metrics`, which writes it)")  # fmt: skip
    write_us, render_us = sink_costs(2000)
    with tempfile.TemporaryDirectory() as tmp:
        off, on = [], []
        for pair in range(args.pairs):
            # Off-on, then on-off (ABBA): a drift over the benchmark, or the second run of
            # a pair running warmer or colder, weighs on both alike.
            order = (False, True) if pair % 2 == 0 else (True, False)
            for prometheus in order:
                times = on if prometheus else off
                times.append(run_step_time(Path(tmp) / f"{prometheus}{pair}", prometheus,
                                           args.steps))  # fmt: skip
    step_off, step_on = statistics.median(off), statistics.median(on)
    rows = [
        ("PrometheusSink.write, one logging step (rank 0)", f"{write_us:.0f} µs"),
        ("rendering one scrape (server thread)", f"{render_us:.0f} µs"),
        (f"step time, metrics off (median of {args.pairs} runs)", f"{1e3 * step_off:.1f} ms"),
        (f"step time, metrics on (median of {args.pairs} runs)", f"{1e3 * step_on:.1f} ms"),
        ("on / off", f"{step_on / step_off:.3f}"),
        ("sink write / step time", f"{write_us / (1e6 * step_off):.5%}"),
    ]
    table = "| what | value |\n|---|---:|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)
    per_run = ", ".join(f"{1e3 * a:.1f}/{1e3 * b:.1f}" for a, b in zip(off, on, strict=True))
    text = (
        "# Monitoring overhead\n\nWritten by `python -m megabatch.trainer.bench_metrics "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{dt.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores. Runs: `megabatch train preset=demo-clip` on one CPU rank "
        f"(the demo's digits, tiny towers, 32 px, batch 64 x 2), {args.steps} steps each, every step logged (the sink's worst case), "
        "metrics off and on (scraped every second) in ABBA order; step time is the median of each run's logged "
        f"steps after two of warm-up. Per pair, off/on ms: {per_run}.\n\n{table}"
    )
    args.output.write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
