"""The Grafana dashboard's queries (deploy/grafana/megabatch.json), for the tests: every
target's expression, whether it reads a CUDA-only metric, the metric names it reads, and
the expression made concrete (the dashboard's variables replaced) for a real Prometheus.

Target fields beyond Grafana's: ``"megabatch_cuda_only": true`` on a query of a metric
only CUDA ranks export (device memory), ``"megabatch_sparse": true`` on one whose series
appear only after an event (the first evaluation, checkpoint or skipped sample, or a
config value that is not null), so that a live test can tell "no data yet" from a wrong
query."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "megabatch.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"

# The metric names a megabatch rank exposes (trainer/prometheus.py, docs/monitoring.md),
# as PromQL sees them: counters with _total, the histogram as its three series.
SPEC_METRICS = frozenset(
    {
        "megabatch_build_info",
        "megabatch_run_info",
        "megabatch_step",
        "megabatch_max_steps",
        "megabatch_samples_total",
        "megabatch_loss",
        "megabatch_learning_rate",
        "megabatch_logit_scale",
        "megabatch_nonfinite_steps_total",
        "megabatch_eval_score",
        "megabatch_checkpoint_duration_seconds",
        "megabatch_checkpoint_size_bytes",
        "megabatch_last_checkpoint_timestamp_seconds",
        "megabatch_checkpoint_interval_seconds",
        "megabatch_checkpoint_failures_total",
        "megabatch_step_duration_seconds_bucket",
        "megabatch_step_duration_seconds_sum",
        "megabatch_step_duration_seconds_count",
        "megabatch_data_wait_seconds_total",
        "megabatch_last_step_timestamp_seconds",
        "megabatch_skipped_samples_total",
        "megabatch_device_memory_bytes",
        "megabatch_device_memory_peak_bytes",
    }
)
CUDA_ONLY_METRICS = frozenset(
    {"megabatch_device_memory_bytes", "megabatch_device_memory_peak_bytes"}
)
# Series Prometheus or prometheus-client's process collector add: `up`, process_*.
OTHER_METRICS = re.compile(r"^(up|process_[a-z_]+)$")

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
     "and", "or", "unless", "atan2", "inf", "nan"}
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)")


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str
    cuda_only: bool
    sparse: bool


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows too; rows themselves are not panels."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def queries(path: Path = DASHBOARD) -> list[Query]:
    """Every target with an expression, in panel order."""
    found = []
    for panel in iter_panels(load(path)):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append(
                    Query(
                        panel["title"],
                        target.get("refId", ""),
                        target["expr"],
                        bool(target.get("megabatch_cuda_only")),
                        bool(target.get("megabatch_sparse")),
                    )  # fmt: skip
                )
    return found


def panel_queries(path: Path = DASHBOARD) -> list[tuple[str, str, bool]]:
    """(panel title, expr, cuda_only) for every target: what a live test runs against a
    real Prometheus (after ``concrete``), skipping cuda_only ones on a CPU run."""
    return [(q.panel, q.expr, q.cuda_only) for q in queries(path)]


def concrete(expr: str, run: str = ".*", rank: str = ".*") -> str:
    """The expression as Grafana would send it with the variables set to these regexes
    (``.*``: every run, every rank)."""
    for name, value in (("run", run), ("rank", rank)):
        expr = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", value, expr)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (functions, keywords, label names and
    durations taken out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _LABEL_LIST.sub("", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group(1)
        rest = text[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or rest.startswith("("):
            continue
        names.add(name)
    return names


def recording_rules(path: Path = RULES) -> set[str]:
    import yaml

    groups = yaml.safe_load(Path(path).read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
