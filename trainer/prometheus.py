"""Prometheus metrics from every rank: an HTTP server per rank (prometheus-client), a
``MetricsSink`` that publishes the loop's logged values to it, and the file_sd targets
file through which a Prometheus finds every rank of every run. docs/monitoring.md lists
the metrics; deploy/prometheus/ has the rules and deploy/grafana/ the dashboard.

Global values (loss, learning rate, samples, evaluation, checkpoints) come from rank 0
only, so that a sum over targets does not count them twice; per-rank values carry a
``rank`` label. Values change on logging steps only (``train.log_every``): the sink adds
no host-device sync to a step. The server answers scrapes from its own threads, one per
request, and renders from the registry's last values: a scraper that hangs or drops the
connection holds its thread, never the training loop.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector

from megabatch.trainer.config import ConfigError, MetricsConfig, RunConfig

TARGETS_FILE = "prometheus-targets.json"
"""Under the run directory: Prometheus ``file_sd`` targets, one entry per rank."""
TARGETS_LINK = "prometheus-targets-{run}.json"
"""Beside the run directory, a relative link to its targets file: file_sd's patterns may
hold a ``*`` in their last path segment only, so ``RUNS/prometheus-targets-*.json``
finds every run in RUNS where ``RUNS/*/prometheus-targets.json`` is refused."""
CONTAINER_PORT_NAME = "metrics"
"""The port's name in job templates (a Kubernetes PodMonitor selects it by name)."""
# Real step times: 50 ms (tiny models on a GPU) to 10 minutes (huge accumulated batches
# on CPU ranks, as make bench-train runs).
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)


def local_rank_from_env() -> int:
    """This process's index on its node, before any process group: torchrun's
    LOCAL_RANK, srun's SLURM_LOCALID, or 0 for a plain process."""
    return int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)


@dataclass
class MetricsServer:
    """A registry and the HTTP server that exposes it on ``address:port``."""

    registry: CollectorRegistry
    address: str
    port: int
    _httpd: object
    linger_s: float = 0.0

    @classmethod
    def start(cls, config: MetricsConfig, local_rank: int) -> MetricsServer:
        """Bind now, before training starts: a port in use is a one-line ConfigError."""
        port = config.port + local_rank
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, fds
        try:
            httpd, _ = start_http_server(port, addr=config.address, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"metrics.port: cannot serve /metrics on {config.address}:{port} "
                f"(metrics.port {config.port} + local rank {local_rank}): "
                f"{exc.strerror or exc}"
            ) from None
        return cls(registry, config.address, httpd.server_port, httpd, config.linger_s)

    def close(self) -> None:
        time.sleep(self.linger_s)
        self._httpd.shutdown()
        self._httpd.server_close()


def target_host(config: MetricsConfig) -> str:
    """The name Prometheus reaches this rank by."""
    if config.host:
        return config.host
    if config.address in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return config.address


def write_targets(run_dir: Path, run: str, entries: list[tuple[str, int, int, str]]) -> Path:
    """RUN/prometheus-targets.json from (host, port, rank, node) per rank, atomically
    (Prometheus re-reads the file when it changes and must never see half of it)."""
    targets = [{"targets": [f"{host}:{port}"],
                "labels": {"run": run, "rank": str(rank), "node": node}}
               for host, port, rank, node in sorted(entries, key=lambda e: e[2])]  # fmt: skip
    path = run_dir / TARGETS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(targets, indent=2) + "\n")
    os.replace(tmp, path)
    link = run_dir.parent / TARGETS_LINK.format(run=run)
    if not link.is_symlink() or os.readlink(link) != f"{run_dir.name}/{TARGETS_FILE}":
        tmp_link = link.with_name(f".{link.name}.tmp")
        tmp_link.unlink(missing_ok=True)
        try:
            os.symlink(f"{run_dir.name}/{TARGETS_FILE}", tmp_link)
            os.replace(tmp_link, link)
        except OSError as exc:  # a read-only runs folder: the file alone still serves
            print(f"megabatch: cannot link {link} to {path}: {exc.strerror or exc}; point "
                  f"Prometheus at {path} itself", file=sys.stderr)  # fmt: skip
    return path


def withdraw_targets(run_dir: Path) -> None:
    """A run that ended cleanly leaves discovery (an empty list), so that its stopped
    ranks are not taken for targets that went down."""
    path = run_dir / TARGETS_FILE
    if path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("[]\n")
        os.replace(tmp, path)


class PrometheusSink:
    """The loop's values -> this rank's registry. Keys it reads from ``write``'s values:
    training records (``loss``, ``lr``, ...; see ``Trainer._log``), ``eval/<metric>``
    and ``checkpoint/<what>`` records."""

    def __init__(self, server: MetricsServer, config: RunConfig, rank: int, world_size: int):
        import torch

        self.server, self.rank, self.main = server, str(rank), rank == 0
        r = server.registry
        build = Gauge("megabatch_build_info", "megabatch and its main libraries' versions",
                      ["version", "python", "torch", "deepspeed"], registry=r)  # fmt: skip
        build.labels(_version("megabatch"), platform.python_version(), torch.__version__,
                     _version("deepspeed")).set(1)  # fmt: skip
        # Per rank: label rank.
        self.step_duration = Histogram(
            "megabatch_step_duration_seconds", "Wall time of one optimizer step",
            ["rank"], buckets=STEP_BUCKETS, registry=r).labels(self.rank)  # fmt: skip
        self.data_wait = Counter("megabatch_data_wait_seconds", "Time spent waiting for input",
                                 ["rank"], registry=r).labels(self.rank)  # fmt: skip
        self.heartbeat = Gauge("megabatch_last_step_timestamp_seconds",
                               "Unix time of this rank's last logged step", ["rank"],
                               registry=r).labels(self.rank)  # fmt: skip
        self.skipped = Counter("megabatch_skipped_samples", "Samples skipped by the loader",
                               ["rank", "reason"], registry=r)  # fmt: skip
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            self.memory = Gauge("megabatch_device_memory_bytes", "CUDA memory allocated",
                                ["rank"], registry=r).labels(self.rank)  # fmt: skip
            self.memory_peak = Gauge("megabatch_device_memory_peak_bytes",
                                     "Peak CUDA memory allocated", ["rank"],
                                     registry=r).labels(self.rank)  # fmt: skip
        self._skipped_seen: dict[str, float] = {}
        self._samples_seen = self._nonfinite_seen = 0.0
        if not self.main:
            return
        # Global: rank 0 only.
        Gauge("megabatch_run_info", "The run's task, model and sizes",
              ["task", "model", "world_size", "global_batch"], registry=r).labels(
            config.task, config.model.preset, str(world_size),
            str(config.global_batch_size(world_size))).set(1)  # fmt: skip
        self.step = Gauge("megabatch_step", "Last completed optimizer step", registry=r)
        Gauge("megabatch_max_steps", "train.max_steps", registry=r).set(config.train.max_steps)
        self.samples = Counter("megabatch_samples", "Samples trained on by the run", registry=r)
        self.loss = Gauge("megabatch_loss", "Last logged loss (NaN when not finite)", registry=r)
        self.lr = Gauge("megabatch_learning_rate", "Learning rate of the next step", registry=r)
        self.scale = Gauge("megabatch_logit_scale", "Logit scale (SimCLR: 1 / temperature)",
                           registry=r)  # fmt: skip
        self.nonfinite = Counter("megabatch_nonfinite_steps",
                                 "Steps skipped for a non-finite loss", registry=r)  # fmt: skip
        self.eval = Gauge("megabatch_eval_score", "Evaluation score (0..1)", ["metric"],
                          registry=r)  # fmt: skip
        self.ckpt_duration = Gauge("megabatch_checkpoint_duration_seconds",
                                   "How long the last checkpoint took", registry=r)  # fmt: skip
        self.ckpt_bytes = Gauge("megabatch_checkpoint_size_bytes",
                                "Bytes of the last checkpoint", registry=r)  # fmt: skip
        self.ckpt_time = Gauge("megabatch_last_checkpoint_timestamp_seconds",
                               "Unix time of the last complete checkpoint", registry=r)  # fmt: skip
        self.ckpt_failures = Counter("megabatch_checkpoint_failures",
                                     "Checkpoints that could not be written", registry=r)  # fmt: skip
        minutes = config.train.checkpoint_every_minutes
        if minutes is not None:
            Gauge("megabatch_checkpoint_interval_seconds", "train.checkpoint_every_minutes",
                  registry=r).set(60 * minutes)  # fmt: skip

    def write(self, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            self._training(step, values)
        elif self.main:
            for key, value in values.items():
                if key.startswith("eval/"):
                    self.eval.labels(key[len("eval/") :]).set(value)
            if "checkpoint/failed" in values:
                self.ckpt_failures.inc()
            if "checkpoint/time" in values:
                self.ckpt_duration.set(values["checkpoint/duration_s"])
                self.ckpt_bytes.set(values["checkpoint/bytes"])
                self.ckpt_time.set(values["checkpoint/time"])

    def _training(self, step: int, values: dict[str, float]) -> None:
        # Steps between two logging steps are not timed apart (that would need a device
        # sync per step): each is observed at the interval's mean.
        for _ in range(int(values["logged_steps"])):
            self.step_duration.observe(values["step_time_s"])
        self.data_wait.inc(values.get("data_wait_s", 0.0))
        for key, total in values.items():
            if key.startswith("skipped_samples/"):
                reason = key[len("skipped_samples/") :]
                # A counter only goes up: prometheus-client raises on a negative inc,
                # and a sink must never stop a run.
                seen = self._skipped_seen.get(reason, 0.0)
                self.skipped.labels(self.rank, reason).inc(max(0.0, total - seen))
                self._skipped_seen[reason] = max(total, seen)
        if self.cuda:
            import torch

            self.memory.set(torch.cuda.memory_allocated())
            self.memory_peak.set(torch.cuda.max_memory_allocated())
        self.heartbeat.set(time.time())
        if not self.main:
            return
        self.step.set(step)
        self.samples.inc(max(0.0, values["samples_seen"] - self._samples_seen))
        self._samples_seen = max(self._samples_seen, values["samples_seen"])
        self.loss.set(values["loss"] if math.isfinite(values["loss"]) else math.nan)
        self.lr.set(values["lr"])
        self.scale.set(values["logit_scale"])
        total = values.get("nonfinite_steps_total", 0.0)
        self.nonfinite.inc(max(0.0, total - self._nonfinite_seen))
        self._nonfinite_seen = max(self._nonfinite_seen, total)

    def close(self) -> None:
        self.server.close()


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"
