"""``megabatch status RUN``: where a run stands, from its run directory alone.

For a user without monitoring: no Prometheus, no process group, no DeepSpeed. It reads

    RUN/config.yaml          the config of the newest start (and, in its comment lines,
                             the world size, the global batch and when it started)
    RUN/configs/NNN.yaml     one per start (how many times the run was started)
    RUN/metrics.jsonl        a record per logged step, and one per evaluation
    RUN/checkpoints/         the complete checkpoints (``checkpoint.complete_checkpoints``)
    RUN/results.json         the final evaluation

and says the step, the loss, the throughput, the ETA, the newest checkpoint, the skipped
samples and the newest evaluation, then warnings on the conditions the Prometheus
alerts raise (``WARNING_RULES`` below says each).

metrics.jsonl is appended to by every start, so a resumed run repeats steps. It is read
as a timeline: a training record whose step is not past the previous one's starts the
run again from there, and the records of that step and later ones (the abandoned
attempt's) are dropped; so the last record of each step wins, and an attempt's steps
past the checkpoint a resume went back to are not taken for the run's progress. A line
that is not a JSON object (a run killed mid-write leaves a truncated last line) is
skipped and counted.

The core is ``run_status(run_dir, now) -> RunStatus``, a pure function of the directory
and the time, and ``format_status(status) -> str``; ``--json`` prints
``status.to_dict()``. Exit status: 0 no warning, 1 a warning, 2 not a run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from megabatch.trainer.config import BatchConfig, ConfigError, TrainConfig, load_config

# Logged steps the recent rates are taken over (throughput, step time, data wait, ETA).
RECENT = 5
# STALLED: no logged step for longer than max(STALL_MIN_S, STALL_INTERVALS x the recent
# interval between logged steps), and the run has not finished.
STALL_MIN_S = 15 * 60.0
STALL_INTERVALS = 10
# ... or, while the newest start has logged nothing yet (start-up: rendezvous, loading
# the checkpoint, the first collective), for longer than STARTUP_GRACE_S since it started
# (deploy/prometheus/rules.yml's STARTUP_GRACE).
STARTUP_GRACE_S = 30 * 60.0
# INPUT-BOUND: the mean data wait fraction of the last RECENT logged steps over this.
INPUT_BOUND_FRACTION = 0.5
# CHECKPOINT OVERDUE: the newest complete checkpoint (or the start, when there is none)
# older than this many times train.checkpoint_every_minutes, and the run not finished.
CHECKPOINT_OVERDUE_FACTOR = 2.0
# SKIPPED: skipped samples over this fraction of the samples seen.
SKIPPED_FRACTION = 0.01
# The evaluation's values are wrapped to lines of at most this many characters.
EVAL_WIDTH = 78

WARNING_RULES = {
    "STALLED": f"no logged step for longer than max({STALL_MIN_S / 60:g} min, "
    f"{STALL_INTERVALS} x the recent interval between logged steps) ({STARTUP_GRACE_S / 60:g} "
    "min after a start that has logged nothing yet), run not finished",
    "INPUT-BOUND": f"data wait fraction over {INPUT_BOUND_FRACTION:g} (mean of the last "
    f"{RECENT} logged steps)",
    "NON-FINITE": "the last logged loss is not finite, or its step is in a non-finite streak",
    "CHECKPOINT OVERDUE": f"newest complete checkpoint older than "
    f"{CHECKPOINT_OVERDUE_FACTOR:g} x train.checkpoint_every_minutes, run not finished",
    "SKIPPED": f"skipped samples over {100 * SKIPPED_FRACTION:g}% of the samples seen",
}

EXIT_HEALTHY, EXIT_WARNING, EXIT_BAD_INPUT = 0, 1, 2


class StatusError(ValueError):
    """Not a run directory, or one whose config cannot be read; the message names the path."""


@dataclass(frozen=True)
class StatusWarning:
    code: str
    """One of WARNING_RULES' keys."""
    message: str
    """What was seen, and what to look at."""


@dataclass
class RunStatus:
    run_dir: str
    task: str
    world_size: int | None
    global_batch_size: int | None
    starts: int
    """Starts of the run (RUN/configs/NNN.yaml): 1, or more once resumed."""
    max_steps: int
    step: int
    """The last logged step (0: none logged yet)."""
    state: str
    """finished, running, starting (no step logged yet) or stopped (stalled, or ended)."""
    now: float
    last_activity_time: float | None
    """The newest record in metrics.jsonl, or the newest start when later."""
    last_activity_age_s: float | None
    stall_after_s: float
    loss: float | None
    loss_step: int | None
    samples_per_s: float | None
    step_time_s: float | None
    data_wait_fraction: float | None
    eta_s: float | None
    """Seconds to max_steps at the recent step time; None when finished or stopped."""
    checkpoint_step: int | None
    checkpoint_path: str | None
    checkpoint_age_s: float | None
    samples_seen: int
    skipped_samples: int
    nonfinite_steps: int
    eval: dict[str, float] = field(default_factory=dict)
    eval_step: int | None = None
    unreadable_lines: int = 0
    warnings: list[StatusWarning] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def exit_status(self) -> int:
        return EXIT_WARNING if self.warnings else EXIT_HEALTHY

    def to_dict(self) -> dict:
        """Plain JSON data; a non-finite number is a string ("nan", "inf"), so that strict
        JSON readers take it."""
        data = asdict(self)
        data["exit_status"] = self.exit_status
        return _json_safe(data)


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Facts:
    """What status needs of the config."""

    task: str
    max_steps: int
    checkpoint_every_minutes: float | None
    micro_batch_size: int
    accumulation_steps: int


def _config_facts(path: Path) -> _Facts:
    try:
        config = load_config(path)
    except ConfigError as exc:
        # A config this version cannot build (a key added or removed since): the few
        # facts status needs, from the YAML as it is.
        return _raw_config_facts(path, exc)
    return _Facts(config.task, config.train.max_steps, config.train.checkpoint_every_minutes,
                  config.batch.micro_batch_size, config.batch.accumulation_steps)  # fmt: skip


def _raw_config_facts(path: Path, error: ConfigError) -> _Facts:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        raise StatusError(str(error)) from None
    if not isinstance(data, dict):
        raise StatusError(str(error))
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    batch = data.get("batch") if isinstance(data.get("batch"), dict) else {}
    defaults_train, defaults_batch = TrainConfig(), BatchConfig()
    minutes = train.get("checkpoint_every_minutes", defaults_train.checkpoint_every_minutes)
    facts = _Facts(
        task=str(data.get("task", "clip")),
        max_steps=train.get("max_steps", defaults_train.max_steps),
        checkpoint_every_minutes=minutes,
        micro_batch_size=batch.get("micro_batch_size", defaults_batch.micro_batch_size),
        accumulation_steps=batch.get("accumulation_steps", defaults_batch.accumulation_steps),
    )
    numbers = (facts.max_steps, facts.micro_batch_size, facts.accumulation_steps)
    if not all(_is_int(n) for n in numbers) or not (minutes is None or _is_number(minutes)):
        raise StatusError(str(error))
    return facts


def _header(path: Path) -> dict[str, str]:
    """The ``# key: value`` lines ``dump_config`` writes above the config."""
    facts = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if sep:
            facts[key.strip()] = value.strip()
    return facts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _header_int(header: dict[str, str], key: str) -> int | None:
    try:
        return int(header[key])
    except (KeyError, ValueError):
        return None


def _started(header: dict[str, str], config_path: Path) -> float:
    try:
        return datetime.fromisoformat(header["started"]).timestamp()
    except (KeyError, ValueError):
        return config_path.stat().st_mtime


def read_metrics(path: Path) -> tuple[list[dict], list[dict], int]:
    """The run's training and evaluation records as a timeline, each by step, and the
    count of unreadable lines (see the module's docstring)."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    unreadable = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                unreadable += 1
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if not _is_int(step) or not _is_number(record.get("time", 0.0)):
                unreadable += 1
                continue
            if "loss" in record:
                if train and step <= max(train):  # a start went back to a checkpoint
                    train = {s: r for s, r in train.items() if s < step}
                    evals = {s: r for s, r in evals.items() if s < step}
                train[step] = record
            elif any(key.startswith("eval/") for key in record):
                evals[step] = record
    return ([train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)], unreadable)


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if _is_number(r.get(key)) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def _recent_interval(records: list[dict]) -> float | None:
    """The median seconds between the last RECENT + 1 logged steps (a resume's downtime
    is one interval of several: the median passes over it)."""
    times = [r["time"] for r in records[-(RECENT + 1) :] if _is_number(r.get("time"))]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
    return statistics.median(gaps) if gaps else None


def _checkpoint_time(path: Path) -> float | None:
    for candidate in (path / "COMPLETE", path / "meta.json", path):
        try:
            return candidate.stat().st_mtime
        except OSError:
            continue
    return None


def _final_results(run_dir: Path) -> dict | None:
    try:
        data = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and _is_int(data.get("step")) else None


# --------------------------------------------------------------------------- the status
def run_status(run_dir: str | Path, now: float | None = None) -> RunStatus:
    """Where the run in ``run_dir`` stands at time ``now`` (default: the current time).
    Raises StatusError when ``run_dir`` is not a run directory."""
    from megabatch.trainer.checkpoint import complete_checkpoints

    now = time.time() if now is None else now
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise StatusError(f"{run_dir}: not a run directory (no such directory)")
    if not run_dir.is_dir():
        raise StatusError(f"{run_dir}: not a run directory (not a directory)")
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for required in (config_path, metrics_path):
        if not required.is_file():
            raise StatusError(f"{run_dir}: not a run directory (no {required.name})")
    try:
        header = _header(config_path)
        facts = _config_facts(config_path)
        started = _started(header, config_path)
        train, evals, unreadable = read_metrics(metrics_path)
    except OSError as exc:
        raise StatusError(f"{run_dir}: cannot read: {exc}") from None

    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    newest = checkpoints[-1] if checkpoints else None
    saved = _checkpoint_time(newest.path) if newest is not None else None
    world_size = _header_int(header, "world_size")
    if world_size is None and newest is not None and _is_int(newest.meta.get("world_size")):
        world_size = newest.meta["world_size"]
    global_batch = _header_int(header, "global_batch_size")
    if global_batch is None and world_size is not None:
        global_batch = facts.micro_batch_size * facts.accumulation_steps * world_size

    last = train[-1] if train else None
    recent = train[-RECENT:]
    step = last["step"] if last else 0
    finished = step >= facts.max_steps
    activity = [r["time"] for r in (train[-1:] + evals[-1:]) if _is_number(r.get("time"))]
    last_activity = max([*activity, started])
    age = max(0.0, now - last_activity)
    interval = _recent_interval(train)
    stall_after = max(STALL_MIN_S, STALL_INTERVALS * interval) if interval else STALL_MIN_S
    starting_up = not activity or max(activity) < started  # nothing logged since the start
    if starting_up:
        stall_after = max(STARTUP_GRACE_S, stall_after)
    stalled = not finished and age > stall_after
    if finished:
        state = "finished"
    elif stalled:
        state = "stopped"
    else:
        state = "running" if last else "starting"

    step_time = _mean(recent, "step_time_s")
    eta = None
    if state in ("running", "starting") and step_time is not None:
        eta = (facts.max_steps - step) * step_time

    eval_values, eval_step = {}, None
    if evals:
        eval_step = evals[-1]["step"]
        eval_values = {k[len("eval/") :]: v for k, v in evals[-1].items() if k.startswith("eval/")}
    results = _final_results(run_dir)
    if results is not None and (eval_step is None or results["step"] >= eval_step):
        eval_step = results["step"]
        eval_values = {k: v for k, v in results.items() if k != "step" and _is_number(v)}

    def count(key: str) -> int:
        value = last.get(key) if last else None
        return int(value) if _is_number(value) and math.isfinite(value) else 0

    status = RunStatus(
        run_dir=str(run_dir), task=facts.task, world_size=world_size,
        global_batch_size=global_batch,
        starts=max(1, len(list((run_dir / "configs").glob("[0-9][0-9][0-9].yaml")))),
        max_steps=facts.max_steps, step=step, state=state, now=now,
        last_activity_time=last_activity, last_activity_age_s=age, stall_after_s=stall_after,
        loss=last["loss"] if last and _is_number(last["loss"]) else None,
        loss_step=step if last else None,
        samples_per_s=_mean(recent, "samples_per_s"), step_time_s=step_time,
        data_wait_fraction=_mean(recent, "data_wait_fraction"), eta_s=eta,
        checkpoint_step=newest.step if newest else None,
        checkpoint_path=str(newest.path) if newest else None,
        checkpoint_age_s=max(0.0, now - saved) if saved is not None else None,
        samples_seen=count("samples_seen"), skipped_samples=count("skipped_samples"),
        nonfinite_steps=count("nonfinite_steps"), eval=eval_values, eval_step=eval_step,
        unreadable_lines=unreadable,
    )  # fmt: skip
    status.warnings = _warnings(status, facts, interval, recent, started, last)
    return status


def _warnings(s: RunStatus, facts: _Facts, interval: float | None, recent: list[dict],
              started: float, last: dict | None) -> list[StatusWarning]:  # fmt: skip
    found = []
    newest = (f"the newest checkpoint is step {s.checkpoint_step} ({s.checkpoint_path})"
              if s.checkpoint_step is not None else "there is no checkpoint yet")  # fmt: skip
    if s.state == "stopped":
        since = f"for {duration(s.last_activity_age_s)}"
        if s.stall_after_s == STARTUP_GRACE_S:
            since = f"since the start {duration(s.last_activity_age_s)} ago"
            why = f"over {duration(STARTUP_GRACE_S)} of start-up"
        elif interval:
            why = (f"over max({duration(STALL_MIN_S)}, {STALL_INTERVALS} x the recent "
                   f"{duration(interval)} between logged steps)")  # fmt: skip
        else:
            why = f"over {duration(STALL_MIN_S)}"
        found.append(StatusWarning("STALLED", (
            f"no logged step {since} ({why}) and the run is not finished: is the job still "
            f"running (squeue, kubectl get pods)? Its log says why it stopped or where it "
            f"hangs; a restart resumes from the newest checkpoint ({newest}, "
            "train.resume=auto)")))  # fmt: skip
    if s.data_wait_fraction is not None and s.data_wait_fraction > INPUT_BOUND_FRACTION:
        found.append(StatusWarning("INPUT-BOUND", (
            f"the ranks waited for data {100 * s.data_wait_fraction:.0f}% of the time over the "
            f"last {len(recent)} logged steps (over {100 * INPUT_BOUND_FRACTION:.0f}%): raise "
            "data.num_workers, check the shards' storage read rate and the workers' CPUs "
            "(docs/data-reader.md)")))  # fmt: skip
    if last is not None:
        loss = last["loss"]
        if not (_is_number(loss) and math.isfinite(loss)) or s.nonfinite_steps > 0:
            streak = (f", {s.nonfinite_steps} non-finite steps in a row (their updates are "
                      "skipped; train.max_nonfinite_steps of them stop the run)"
                      if s.nonfinite_steps > 0 else "")  # fmt: skip
            found.append(StatusWarning("NON-FINITE", (
                f"the loss at step {s.step} is {_number(loss)}{streak}: lower optim.lr (or "
                f"raise optim.warmup_steps), use engine.precision=fp32 or bf16 over fp16; "
                f"{newest}")))  # fmt: skip
    minutes = facts.checkpoint_every_minutes
    if minutes is not None and not s.finished:
        limit = CHECKPOINT_OVERDUE_FACTOR * 60 * minutes
        # The save timer starts again with every start (train.py).
        checkpoint_time = s.now - s.checkpoint_age_s if s.checkpoint_age_s is not None else None
        since = max(started, checkpoint_time) if checkpoint_time is not None else started
        if s.now - since > limit:
            what = (f"the newest complete checkpoint (step {s.checkpoint_step}) is "
                    f"{duration(s.checkpoint_age_s)} old" if s.checkpoint_step is not None
                    else f"no complete checkpoint {duration(s.now - started)} after the start")  # fmt: skip
            found.append(StatusWarning("CHECKPOINT OVERDUE", (
                f"{what}, over {CHECKPOINT_OVERDUE_FACTOR:g} x train.checkpoint_every_minutes="
                f"{minutes:g}: look for a failed save in the job's log, free space under "
                f"{s.run_dir}/checkpoints, and a non-finite streak (no save during one)")))  # fmt: skip
    # metrics.jsonl's skipped_samples are rank 0's loader's; samples_seen the whole run's:
    # compare with rank 0's share of the samples.
    rank0_seen = s.samples_seen / (s.world_size or 1)
    if rank0_seen > 0 and s.skipped_samples > SKIPPED_FRACTION * rank0_seen:
        found.append(StatusWarning("SKIPPED", (
            f"rank 0 skipped {s.skipped_samples} samples, {100 * s.skipped_samples / rank0_seen:.1f}% "
            f"of the {rank0_seen:.0f} it read (over {100 * SKIPPED_FRACTION:g}%): the job's log "
            "names the reasons; check the shards with megabatch data inspect")))  # fmt: skip
    return found


# --------------------------------------------------------------------------- output
def duration(seconds: float | None) -> str:
    """45s, 12m30s, 3h05m, 2d04h."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _number(value) -> str:
    if _is_number(value) and math.isfinite(value):
        return f"{value:.4f}"
    return str(value).lower() if _is_number(value) else repr(value)


def format_status(s: RunStatus) -> str:
    """The status as a few aligned lines, the warnings last (each on its own line)."""
    about = [s.task]
    if s.world_size is not None:
        about.append(f"world size {s.world_size}")
    if s.global_batch_size is not None:
        about.append(f"global batch {s.global_batch_size}")
    if s.starts > 1:
        about.append(f"{s.starts} starts")
    percent = 100 * s.step / s.max_steps if s.max_steps else 0.0
    progress = f"{s.step} of {s.max_steps} ({percent:.0f}%), "
    ago = duration(s.last_activity_age_s)
    if s.state == "finished":
        progress += "finished"
    elif s.state == "starting":
        progress += f"starting, no step logged yet (started {ago} ago)"
    else:
        progress += f"{s.state}, last step {ago} ago"
    rows = [("run", f"{s.run_dir} ({', '.join(about)})"), ("step", progress)]
    rows.append(("loss", f"{_number(s.loss) if s.loss is not None else '-'}"
                         + (f" (step {s.loss_step})" if s.loss_step is not None else "")))  # fmt: skip
    if s.samples_per_s is not None:
        parts = [f"{s.samples_per_s:.0f} samples/s"]
        if s.step_time_s is not None:
            parts.append(f"step {s.step_time_s:.2f} s")
        if s.data_wait_fraction is not None:
            parts.append(f"data wait {100 * s.data_wait_fraction:.0f}%")
        rows.append(("throughput", ", ".join(parts)))
    else:
        rows.append(("throughput", "-"))
    if s.eta_s is not None:
        rows.append(("ETA", f"{duration(s.eta_s)} at the recent rate"))
    else:
        rows.append(("ETA", "-" if s.state != "stopped" else "- (not running)"))
    if s.checkpoint_step is not None:
        rows.append(("checkpoint", f"step {s.checkpoint_step}, {duration(s.checkpoint_age_s)} "
                                   f"ago ({s.checkpoint_path})"))  # fmt: skip
    else:
        rows.append(("checkpoint", "none yet"))
    skipped = f"{s.skipped_samples} samples on rank 0"
    rank0_seen = s.samples_seen / (s.world_size or 1)
    if s.skipped_samples and rank0_seen > 0:
        skipped += f" ({100 * s.skipped_samples / rank0_seen:.2f}% of its {rank0_seen:.0f})"
    rows.append(("skipped", skipped))
    if s.eval:
        values = [f"{k} {v:.3f}" if _is_number(v) else f"{k} {v}" for k, v in s.eval.items()]
        values[-1] += f" (step {s.eval_step})"
        wrapped = [""]  # at EVAL_WIDTH characters, continued under the first line
        for value in values:
            if wrapped[-1] and len(wrapped[-1]) + 2 + len(value) > EVAL_WIDTH:
                wrapped.append("")
            wrapped[-1] += ("  " if wrapped[-1] else "") + value
        rows += [("eval" if i == 0 else "", line) for i, line in enumerate(wrapped)]
    else:
        rows.append(("eval", "none yet"))
    if s.unreadable_lines:
        rows.append(("metrics", f"{s.unreadable_lines} unreadable line(s) of metrics.jsonl "
                                "skipped"))  # fmt: skip
    lines = [f"{label:<10} {value}" for label, value in rows]
    if not s.warnings:
        lines.append(f"{'warnings':<10} none")
    for i, warning in enumerate(s.warnings):
        lines.append(f"{'warnings' if i == 0 else '':<10} {warning.code}: {warning.message}")
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- the command
def add_status_command(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser(
        "status",
        help="say where a run stands (step, loss, ETA, checkpoint, warnings) from its folder",
        description="Read RUN/config.yaml, metrics.jsonl, checkpoints/ and results.json "
        "(no Prometheus, no process group) and print the step, loss, throughput, ETA, "
        "newest checkpoint, skipped samples and newest evaluation, then warnings: STALLED, "
        "INPUT-BOUND, NON-FINITE, CHECKPOINT OVERDUE, SKIPPED. Exit status: 0 no warning, "
        "1 a warning, 2 not a run directory.",
    )
    status.add_argument("run_dir", type=Path, metavar="RUN")
    status.add_argument("--json", action="store_true",
                        help="print the same facts as one JSON object (for scripts)")  # fmt: skip
    status.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        status = run_status(args.run_dir)
    except StatusError as exc:
        print(f"megabatch status: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(status.to_dict(), allow_nan=False))
    else:
        print(format_status(status))
    return status.exit_status


__all__ = ["RunStatus", "StatusError", "StatusWarning", "add_status_command", "format_status",
           "run_status"]  # fmt: skip
