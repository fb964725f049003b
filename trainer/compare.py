"""``megabatch compare``: every method trained on the demo digits with the same backbone
and budget, evaluated the same way, against two baselines, into docs/methods.md.

The rows come from the registry, so a new method appears without a change here: for
each task of ``tasks.TASKS``, image methods first, the preset ``demo-TASK.yaml`` (row
TASK) and any ``demo-TASK-VARIANT.yaml`` (row TASK-VARIANT, e.g. clip-siglip), then the
``VARIANTS`` below, which differ from a preset by overrides only (SimCLR with the margin
loss). A task without a demo preset has no row. The image methods' presets share the
backbone (tiny-resnet, 32 px), the steps and the global batch (trainer/README.md); the
table shows each row's, so a preset that strays is seen.

Each row is one ``megabatch launch --nproc-per-node=R train preset=demo-... run_dir=RUNS/ROW
train.eval_every=null`` (only the final evaluation: periodic ones would cost each preset
a different share of its wall time), timed from start to exit; its figures are the run's
RUN/results.json. The baselines (``compare_baselines``) are evaluated in this process
from demo-simclr's config. Every row's config is checked (``preflight.check_run``)
before the first run starts, so that bad input costs no training.

RUNS/ROW belongs to compare: ``RUNS/ROW/compare.json`` (this module's file, written
atomically) records the row's config, world size, wall time and results. A rerun
replaces a folder holding one and refuses any other existing folder. With ``--reuse`` a
finished row whose recorded config and world size equal the new ones is taken as it is
(its recorded wall time included) instead of trained again; the code is not compared, so
rerun without ``--reuse`` after a change to a method.

Exit status: 0 the table written, 1 a run failed (the table is written, that row marked
failed), 2 bad input (an unknown method, a bad option or override, missing data), one
line. Targets that are not met do not change the status: the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from megabatch.trainer.atomic_write import atomic_file
from megabatch.trainer.compare_table import (
    RANDOM_BACKBONE,
    RAW_PIXELS,
    Provenance,
    Row,
    check_targets,
    render,
    write_table,
)
from megabatch.trainer.config import (
    ConfigError,
    RunConfig,
    available_presets,
    load_config,
    plain_dict,
)
from megabatch.trainer.console import first_line
from megabatch.trainer.losses import LOSSES, TASK_LOSS
from megabatch.trainer.preflight import check_run
from megabatch.trainer.tasks import TASKS

DEFAULT_OUT = Path("docs/methods.md")
DEFAULT_RUNS = Path("runs/compare")
DEFAULT_RANKS = 2
# The image methods' shared backbone, and the baselines' config.
BASELINE_PRESET = "demo-simclr"
RECORD = "compare.json"


@dataclass(frozen=True)
class Method:
    """A row to train: a preset and the overrides on top of it."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()


# Rows that are a preset plus overrides (listed after their preset's row, when it exists).
VARIANTS = (Method("simclr-margin", "demo-simclr", ("loss.name=margin",)),)
# What the table calls a task and a loss (a name missing here is shown as it is).
TASK_TITLES = {"clip": "CLIP", "simclr": "SimCLR", "moco": "MoCo v3", "byol": "BYOL",
               "rotation": "rotation prediction", "relative_patch": "relative patch position",
               "jigsaw": "jigsaw puzzle"}  # fmt: skip
LOSS_TITLES = {"infonce": "softmax", "siglip": "SigLIP", "ntxent": "NT-Xent", "margin": "margin"}


class CompareError(ValueError):
    """Bad input to ``megabatch compare``: one line, exit status 2."""


def discover() -> list[Method]:
    """Every row the registry and the presets give, in table order (see the module)."""
    presets = set(available_presets())
    rows = []
    for task in sorted(TASKS, key=lambda name: TASKS[name].captions):  # stable: registry order
        base = f"demo-{task}"
        variants = sorted(p for p in presets if p.startswith(base + "-"))
        rows += [Method(p.removeprefix("demo-"), p) for p in [base, *variants] if p in presets]
        rows += [v for v in VARIANTS if v.preset == base and base in presets]
    return rows


def select(methods: list[Method], names: str | None) -> list[Method]:
    """``--methods a,b``: those rows, in table order; None: all of them."""
    if names is None:
        return methods
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {m.name for m in methods}
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        what = f"unknown method {unknown[0]!r}" if unknown else "--methods names no method"
        raise CompareError(f"{what} (choose from {', '.join(m.name for m in methods)})")
    return [m for m in methods if m.name in wanted]


def label(config: RunConfig) -> str:
    """The task's title, and its loss where the task has a choice: "SimCLR, margin loss"."""
    title = TASK_TITLES.get(config.task, config.task)
    if sum(config.task in spec.tasks for spec in LOSSES.values()) < 2:
        return title
    loss = config.loss.name or TASK_LOSS.get(config.task, "")
    return f"{title}, {LOSS_TITLES.get(loss, loss)} loss"


@dataclass(frozen=True)
class Planned:
    method: Method
    overrides: list[str]
    """What ``megabatch train`` is given (and what ``config`` was loaded from)."""
    config: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def plan(methods: list[Method], runs: Path, steps: int | None, extra: list[str]) -> list[Planned]:
    """Each row's overrides and config: its preset, its own overrides, the user's, then
    compare's (run directory, final evaluation only, ``--steps``)."""
    out = []
    for method in methods:
        overrides = [f"preset={method.preset}", *method.overrides, *extra,
                     f"run_dir={runs / method.name}", "train.eval_every=null",
                     *([f"train.max_steps={steps}"] if steps is not None else [])]  # fmt: skip
        out.append(Planned(method, overrides, _load(method.name, overrides)))
    return out


def check(planned: list[Planned], ranks: int) -> None:
    """Every row's checks before any run (data, tokenizer, batch arithmetic for ``ranks``),
    and that no run folder is someone else's."""
    for p in planned:
        try:
            check_run(_load(p.method.name, [*p.overrides, "train.resume=none"]), ranks)
        except ConfigError as exc:
            hint = (" (write the digits: `megabatch data write --from demo --out data/digits` "
                    "and `megabatch data tokenizer`; `make compare` does both)"
                    if str(exc).startswith("data.") else "")  # fmt: skip
            raise CompareError(f"{p.method.name} (preset {p.method.preset}): {exc}{hint}") from None
        occupied = p.run_dir.is_file() or (p.run_dir.is_dir() and any(p.run_dir.iterdir()))
        if occupied and not (p.run_dir / RECORD).is_file():
            raise CompareError(f"{p.run_dir} exists and was not made by megabatch compare "
                               f"(no {RECORD}); remove it or choose another --runs")  # fmt: skip


def _load(name: str, overrides: list[str]) -> RunConfig:
    try:
        return load_config(None, overrides)
    except ConfigError as exc:
        raise CompareError(f"{name}: {exc}") from None


def train_row(p: Planned, ranks: int, reuse: bool) -> tuple[Row, int]:
    """(the row, the training command's exit status): trained now, or reused."""
    command = ["megabatch", "launch", f"--nproc-per-node={ranks}", "train", *p.overrides]
    row = Row(p.method.name, label(p.config), _kind(p.config), command=shlex.join(command),
              steps=p.config.train.max_steps,
              global_batch=p.config.global_batch_size(ranks))  # fmt: skip
    record = _read_record(p.run_dir)
    if reuse and _reusable(record, p.config, ranks):
        row.results, row.wall_s = _results(record["results"], row), record["wall_s"]
        row.note = f"reused: trained {record['started']}"
        _say(f"{row.name}: reusing {p.run_dir} (trained {record['started']})")
        return row, 0
    if p.run_dir.exists():
        shutil.rmtree(p.run_dir)  # compare's own (checked): a fresh run, not a resume
    p.run_dir.mkdir(parents=True)
    record = {"method": p.method.name, "overrides": p.overrides, "ranks": ranks,
              "config": plain_dict(p.config), "started": _now(), "wall_s": None,
              "exit_status": None, "results": None}  # fmt: skip
    _write_record(p.run_dir, record)
    _say(f"{row.name} ({row.label}): {row.steps} step{'s' * (row.steps != 1)} at global batch "
         f"{row.global_batch} on {ranks} rank{'s' * (ranks != 1)} -> {p.run_dir}")  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    started = time.monotonic()
    status = subprocess.run([sys.executable, "-m", "megabatch.trainer.cli", *command[1:]],
                            env=env, check=False).returncode  # fmt: skip
    row.wall_s = time.monotonic() - started
    results_file = p.run_dir / "results.json"
    if status == 0 and results_file.is_file():
        results = json.loads(results_file.read_text())
        row.results = _results(results, row)
        record["results"] = results
    else:
        row.note = f"failed: exit status {status}" if status else "failed: no results.json"
        status = status or 1
    record.update(wall_s=row.wall_s, exit_status=status)
    _write_record(p.run_dir, record)
    _say(f"{row.name}: {_summary(row)} in {row.wall_s:.0f} s")
    return row, status


def _kind(config: RunConfig) -> str:
    return "caption" if TASKS[config.task].captions else "image"


def _results(results: dict, row: Row) -> dict[str, float]:
    """RUN/results.json's metrics; its ``step`` becomes the row's steps."""
    row.steps = results.get("step", row.steps)
    return {k: v for k, v in results.items() if k != "step"}


def _reusable(record: dict | None, config: RunConfig, ranks: int) -> bool:
    return (record is not None and record.get("exit_status") == 0
            and record.get("results") is not None and record.get("ranks") == ranks
            and record.get("config") == plain_dict(config))  # fmt: skip


def _read_record(run_dir: Path) -> dict | None:
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(run_dir: Path, record: dict) -> None:
    with atomic_file(run_dir / RECORD, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def baselines(extra: list[str]) -> list[Row]:
    """Raw pixels and the random backbone, from demo-simclr's config with the user's
    overrides (the image methods' backbone and image size)."""
    from megabatch.trainer.compare_baselines import random_backbone, raw_pixels

    config = _load("baselines", [f"preset={BASELINE_PRESET}", *extra])
    how = (
        f"evaluated by megabatch compare itself (`trainer/compare_baselines.py`, "
        f"`{{}}`) on preset {BASELINE_PRESET}'s config" + (" with the overrides" if extra else "")
    )
    rows = [Row(RAW_PIXELS, f"raw pixels ({3 * config.model.image_size**2} values)", "baseline",
                command=how.format("raw_pixels")),
            Row(RANDOM_BACKBONE, f"random backbone ({config.model.preset}, untrained, seed "
                f"{config.seed})", "baseline", command=how.format("random_backbone"))]  # fmt: skip
    for row, evaluate in zip(rows, (raw_pixels, random_backbone), strict=True):
        _say(f"baseline: {row.label}")
        started = time.monotonic()
        row.results = evaluate(config)
        _say(f"baseline: {row.label}: {_summary(row)} in {time.monotonic() - started:.0f} s")
    return rows


def _summary(row: Row) -> str:
    names = {"linear_probe_top1": "linear probe", "knn_top1": "kNN", "zeroshot_top1": "zero-shot"}
    found = [f"{names[k]} {row.results[k]:.3f}" for k in names if k in row.results]
    return ", ".join(found) or row.note or "no results"


def _say(line: str) -> None:
    print(f"compare: {line}", file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_compare_command(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare",
        help="train every method on the digits with one backbone and budget; "
        "probe, kNN and zero-shot against baselines -> docs/methods.md",
        description="Train every method on the demo digits (data/digits: `megabatch data "
        "write --from demo` and `megabatch data tokenizer`, or `make compare`) with the same "
        "backbone and budget, and write docs/methods.md: linear-probe and kNN top-1 on the "
        "held-out digits (CLIP: zero-shot too), steps, global batch and wall time per "
        "method, against raw pixels and the untrained backbone, and the targets met or not "
        "with their margins. Methods: every task of the registry with a preset "
        "demo-TASK.yaml (and demo-TASK-VARIANT.yaml), plus SimCLR with the margin loss; "
        "--list shows them. Each trains as `megabatch launch --nproc-per-node=RANKS train "
        "preset=demo-... run_dir=RUNS/METHOD train.eval_every=null`, one after another "
        "(3-5 min each on 2 idle CPU cores). RUNS/METHOD belongs to compare and is replaced; a "
        "folder there that compare did not make is refused. Exit status: 0 written, 1 a "
        "run failed (written, the row marked), 2 bad input. See docs/training.md, "
        '"Comparing methods".',
    )
    compare.add_argument("--methods", metavar="A,B",
                         help="comma-separated methods to train (default: all; see --list); "
                         "the baselines are always evaluated")  # fmt: skip
    compare.add_argument("--steps", type=_positive, metavar="N",
                         help="training steps for every method (default: each preset's "
                         "train.max_steps)")  # fmt: skip
    compare.add_argument("--ranks", type=_positive, default=DEFAULT_RANKS, metavar="R",
                         help=f"CPU ranks per run (default {DEFAULT_RANKS}); the global "
                         "batch is micro x accumulation x R")  # fmt: skip
    compare.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="FILE",
                         help=f"the table to write (default {DEFAULT_OUT}), replaced "
                         "atomically")  # fmt: skip
    compare.add_argument("--runs", type=Path, default=DEFAULT_RUNS, metavar="DIR",
                         help=f"where the runs go, one folder per method (default "
                         f"{DEFAULT_RUNS})")  # fmt: skip
    compare.add_argument("--reuse", action="store_true",
                         help=f"take a method's finished run in DIR/METHOD as it is when "
                         f"its recorded config ({RECORD}) and ranks equal this one's "
                         "(default: train every method again); code changes are not "
                         "detected")  # fmt: skip
    compare.add_argument(
        "--list",
        action="store_true",
        help="print the methods (name, preset, overrides, label) and exit",
    )
    compare.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides for every method and the baselines, after "
                         "the preset's (e.g. data.num_workers=2)")  # fmt: skip
    compare.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    try:
        methods = discover()
        if args.list:
            for p in plan(methods, args.runs, args.steps, args.overrides):
                print("\t".join([p.method.name, p.method.preset, " ".join(p.method.overrides)
                                 or "-", label(p.config)]))  # fmt: skip
            return 0
        planned = plan(select(methods, args.methods), args.runs, args.steps, args.overrides)
        check(planned, args.ranks)
        _load("baselines", [f"preset={BASELINE_PRESET}", *args.overrides])
    except CompareError as exc:
        print(f"megabatch compare: error: {first_line(exc)}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()[0]
    rows, status = baselines(args.overrides), 0
    for p in planned:
        row, code = train_row(p, args.ranks, args.reuse)
        rows.append(row)
        status = status or (1 if code else 0)
    provenance = Provenance(command=_command_line(args),
                            date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                            machine=_machine(), ranks=args.ranks,
                            load=(load_start, os.getloadavg()[0]),
                            baseline_preset=BASELINE_PRESET)  # fmt: skip
    text = render(rows, check_targets(rows), provenance)
    write_table(args.out, text)
    print(text)
    _say(f"wrote {args.out}")
    return status


def _command_line(args: argparse.Namespace) -> str:
    """The command as given, its options in a fixed order (defaults left out)."""
    parts = ["megabatch", "compare"]
    for flag, value, default in (("--methods", args.methods, None), ("--steps", args.steps, None),
                                 ("--ranks", args.ranks, DEFAULT_RANKS),
                                 ("--out", args.out, DEFAULT_OUT),
                                 ("--runs", args.runs, DEFAULT_RUNS)):  # fmt: skip
        if value != default:
            parts += [flag, str(value)]
    if args.reuse:
        parts.append("--reuse")
    return shlex.join([*parts, *args.overrides])


def _machine() -> str:
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} on the CPU "
            f"(OMP_NUM_THREADS={threads} per rank)")  # fmt: skip
