"""``megabatch submit slurm CONFIG [KEY=VALUE ...]``: a run handed to a scheduler.

The config is resolved and checked here, on the submitting machine, with the world size
the job will have (the same checks the ranks make before any process group: a bad key, a
batch that does not divide, missing shards, or a checkpoint in the run directory that
this config may not resume are said now, not after the job waited in the queue). Then
RUN/submit/ receives the resolved config (``config.yaml``, what every requeue of the job
runs) and the rendered job script, and the scheduler gets the script. ``--dry-run``
writes both and prints the command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from megabatch.trainer.commands import add_config_arguments, config_argument
from megabatch.trainer.config import ConfigError, dump_config, load_config

SUBMIT_DIR = "submit"
"""Under the run directory: the resolved config, the job scripts, the job ids."""


def add_submit_command(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit",
        help="submit a training run to Slurm (render the job script, sbatch it)",
        description="Resolve and check the config for the job's world size, write "
        "RUN/submit/config.yaml and the job script, and submit it. docs/deploy.md.",
    )
    schedulers = submit.add_subparsers(dest="scheduler", metavar="SCHEDULER", required=True)
    slurm = schedulers.add_parser(
        "slurm",
        help="render deploy/slurm/megabatch.sbatch and submit it with sbatch --parsable",
        description="One srun task per GPU (per CPU rank with --gpus-per-node=0). Slurm "
        "sends SIGUSR2 --warning-s seconds before the time limit; the ranks save and exit "
        "75, and the job requeues itself (up to --max-requeues) and resumes from that "
        "checkpoint. A preemption's SIGTERM does the same. Exit status: 0 submitted (or "
        "written, with --dry-run), 2 bad config or options, 1 sbatch missing or refusing.",
    )
    add_config_arguments(slurm)
    shape = slurm.add_argument_group("the job's shape")
    shape.add_argument("--nodes", type=int, default=1)
    shape.add_argument("--gpus-per-node", type=int, default=0,
                       help="GPUs per node (0: CPU ranks, gloo)")  # fmt: skip
    shape.add_argument("--tasks-per-node", type=int, default=None,
                       help="ranks per node (default: the GPUs per node, or 1 for CPU)")  # fmt: skip
    shape.add_argument("--cpus-per-task", type=int, default=4,
                       help="CPUs per rank, for its data workers too (default 4)")  # fmt: skip
    sched = slurm.add_argument_group("scheduler options")
    sched.add_argument("--time", dest="time_limit", default=None,
                       help="time limit (minutes, HH:MM:SS, D-HH:MM, ...); default: the partition's")  # fmt: skip
    sched.add_argument("--partition", default=None)
    sched.add_argument("--account", default=None)
    sched.add_argument("--qos", default=None)
    sched.add_argument("--constraint", default=None)
    sched.add_argument("--job-name", default=None, help="default: megabatch-RUN")
    sched.add_argument("--sbatch-option", dest="sbatch_options", action="append", default=[],
                       metavar="OPTION", help="another #SBATCH line, e.g. --mail-type=END (repeatable)")  # fmt: skip
    sched.add_argument("--warning-s", type=int, default=300,
                       help="seconds before the time limit at which the ranks get SIGUSR2 "
                       "and save (a step plus a checkpoint; default 300)")  # fmt: skip
    sched.add_argument("--max-requeues", type=int, default=20,
                       help="times the job requeues itself after saving on a signal (default 20)")  # fmt: skip
    sched.add_argument("--python", default=sys.executable,
                       help="interpreter the ranks run (default: this one, %(default)s)")  # fmt: skip
    slurm.add_argument("--dry-run", action="store_true",
                       help="write RUN/submit/ and print the sbatch command; submit nothing")  # fmt: skip
    slurm.set_defaults(func=_cmd_submit_slurm)


def _cmd_submit_slurm(args: argparse.Namespace) -> int:
    from megabatch.trainer import slurm

    options = slurm.SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, time_limit=args.time_limit, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint,
        sbatch_options=args.sbatch_options, warning_s=args.warning_s,
        max_requeues=args.max_requeues, job_name=args.job_name, python=args.python,
    )  # fmt: skip
    try:
        options.check()
        config = _checked_config(*config_argument(args), options.world_size)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    run_dir = Path(config.run_dir)
    folder = run_dir / SUBMIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    config_path, script = folder / "config.yaml", folder / slurm.SCRIPT_NAME
    text = slurm.render(options, config_path, run_dir, Path.cwd())
    dump_config(config, config_path, extra={"submitted": _now(), "world_size": options.world_size})
    _write_atomically(script, text)
    if args.dry_run:
        print(f"wrote {script} and {config_path}; submit with:\n  sbatch --parsable {script}")
        return 0
    try:
        job = slurm.sbatch(script)
    except slurm.SubmitError as exc:
        return _fail(str(exc), 1)
    with (folder / "jobs.txt").open("a") as jobs:
        jobs.write(f"{job} slurm {_now()}\n")
    log = run_dir / slurm.LOG_NAME.replace("%j", job)
    print(f"submitted Slurm job {job}: {options.nodes} node(s) x {options.ranks_per_node} rank(s)\n"
          f"  run directory  {run_dir}\n"
          f"  job script     {script}\n"
          f"  log            {log}\n"
          f"  follow         squeue -j {job}; sacct -j {job}; megabatch status {run_dir}; "
          f"tail -f {log}\n"
          f"  metrics        {run_dir / 'prometheus-targets.json'} (with metrics.prometheus=true)")  # fmt: skip
    return 0


def _checked_config(path: str | None, overrides: list[str], world_size: int):
    """The resolved config, checked for ``world_size`` ranks, with an absolute run_dir
    (the job may start anywhere)."""
    from megabatch.trainer.preflight import check_run

    config = load_config(path, overrides)
    config.run_dir = os.path.abspath(config.run_dir)
    check_run(config, world_size)
    return config


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fail(message: str, status: int) -> int:
    print(f"megabatch submit slurm: error: {message}", file=sys.stderr)
    return status
