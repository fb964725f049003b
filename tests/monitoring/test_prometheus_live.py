"""A real Prometheus (Debian's package) scrapes a real 2-rank CPU training run that it
finds through the run's file_sd targets file; through Prometheus's HTTP API: both ranks'
targets up and scraped without error, the step at the run's last step, the samples
counter at steps x global batch, and every dashboard panel's query returning data.

`.ci/run` installs Prometheus; elsewhere these tests skip without it, unless
MEGABATCH_REQUIRE_PROMETHEUS=1 (set by `.ci/run`) makes its absence a failure."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.dashboard import concrete, queries
from tests.real_parts import needs
from tests.trainer.runs import ROOT, command, env, overrides, write_data

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    needs("prometheus", None if PROMETHEUS else "prometheus not installed (.ci/run installs it)"),
    pytest.mark.slow,
    pytest.mark.multiproc,
    pytest.mark.timeout(300),
]
STEPS, GLOBAL_BATCH = 8, 32  # 8 x 2 micro-batches x 2 ranks (tests/trainer/runs.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def prometheus(tmp_path):
    """Prometheus on a loopback port, scraping every second whatever the runs under
    tmp_path/runs name in their targets files."""
    runs = tmp_path / "runs"
    runs.mkdir()
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "megabatch", "honor_labels": True,
            "file_sd_configs": [{"files": [str(runs / "prometheus-targets-*.json")],
                                 "refresh_interval": "1s"}],
        }],
    }))  # fmt: skip
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        _until(lambda: _ready(server), 60, "Prometheus to start", tmp_path / "prometheus.log")
        yield server, runs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _ready(server: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _until(check, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def test_prometheus_scrapes_both_ranks_of_a_real_run(prometheus, data):
    server, runs = prometheus
    run = runs / "live"
    # Slow enough for several scrapes of every step; the servers stay up 20 s after the
    # end so that the final values are scraped while the targets are still listed.
    argv = overrides(data, run, **{"train.max_steps": STEPS, "metrics.prometheus": "true",
                                   "metrics.port": _free_port(), "metrics.linger_s": 20,
                                   "train.checkpoint_every_steps": 4,
                                   "train.checkpoint_every_minutes": 30})  # fmt: skip
    proc = subprocess.Popen(command(argv, ranks=2), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:

        def at_last_step():
            found = server.query('megabatch_step{run="live"}')
            return found and float(found[0]["value"][1]) == STEPS

        _until(at_last_step, 200, f"megabatch_step == {STEPS} in Prometheus")
        health: dict[str, tuple[str, str]] = {}

        def both_ranks_up():
            # A target's health is its last scrape's: on a loaded 2-core CI machine one
            # scrape may outlast the 1 s timeout while the rank is busy, so both must be
            # seen healthy at once within a few scrapes, not at the first look.
            targets = server.get("/api/v1/targets")["activeTargets"]
            ours = [t for t in targets if t["labels"].get("run") == "live"]
            health.clear()
            health.update({t["labels"]["rank"]: (t["health"], t["lastError"]) for t in ours})
            up = server.query('up{job="megabatch", run="live"}')
            return (sorted(health) == ["0", "1"]
                    and all(h == ("up", "") for h in health.values())
                    and sorted(float(s["value"][1]) for s in up) == [1.0, 1.0])  # fmt: skip

        try:
            _until(both_ranks_up, 10, "both ranks' targets up and scraped without error")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: rank -> (health, last error) {health}") from None
        samples = server.query('megabatch_samples_total{run="live"}')
        assert [float(s["value"][1]) for s in samples] == [STEPS * GLOBAL_BATCH]
        heartbeats = server.query('megabatch_last_step_timestamp_seconds{run="live"}')
        assert sorted(s["metric"]["rank"] for s in heartbeats) == ["0", "1"]
        _until(lambda: server.query('megabatch_last_checkpoint_timestamp_seconds{run="live"}'),
               30, "the checkpoint metrics")  # fmt: skip
        _until(lambda: server.query('megabatch_eval_score{run="live"}'), 60,
               "the final evaluation's scores")  # fmt: skip

        # Rates need two samples in their window: a few more scrapes of the final values.
        def scraped_often():
            counts = server.query('count_over_time(up{job="megabatch", run="live"}[1m])')
            return len(counts) == 2 and all(float(c["value"][1]) >= 5 for c in counts)

        _until(scraped_often, 30, "5 scrapes of each rank")
        empty = []
        for q in queries():
            if q.cuda_only:
                continue  # device memory: CUDA ranks only
            expr = concrete(q.expr, run="live")
            if not server.query(expr):
                empty.append(f"{q.panel} ({q.ref_id}): {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    # A finished run leaves discovery: its stopped ranks are no targets that went down.
    assert json.loads((run / "prometheus-targets.json").read_text()) == []
