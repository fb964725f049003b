"""``megabatch submit slurm``: render deploy/slurm/megabatch.sbatch for a run and hand it
to ``sbatch --parsable``.

The script runs one srun task per GPU (per CPU rank with ``--gpus-per-node=0``), asks
Slurm for SIGUSR2 ``warning_s`` seconds before the time limit (the ranks save and exit 75
on it, as on a preemption's SIGTERM), and requeues itself on exit 75 up to
``max_requeues`` times (SLURM_RESTART_COUNT counts them). docs/deploy.md tells the whole
path.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megabatch.trainer.config import ConfigError
from megabatch.trainer.submission import JobShape, deploy_file_text, run_tool

TEMPLATE = ("slurm", "megabatch.sbatch")
"""Where the template lives in ``megabatch.deploy`` (the repository's deploy/ folder)."""
SCRIPT_NAME = "megabatch.sbatch"
LOG_NAME = "slurm-%j.log"
"""In the run directory; %j is the job id, the same across requeues (the log appends)."""
_FIELD = re.compile(r"\{\{(\w+)\}\}")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmOptions(JobShape):
    """The job's shape and the scheduler's options (``megabatch submit slurm --help``)."""

    cpus_per_task: int = 4
    time_limit: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch_options: list[str] = field(default_factory=list)
    """Further ``#SBATCH`` options, each as sbatch takes it (``--mail-type=END``)."""
    warning_s: int = 300
    """Seconds before the time limit at which Slurm sends SIGUSR2: a step plus a save."""
    max_requeues: int = 20
    job_name: str | None = None
    python: str = "python3"
    """The interpreter the ranks run megabatch with (the submitting one by default)."""

    def check(self) -> None:
        """One-line ConfigError for a value sbatch would refuse or a job that could not work."""
        self.check_shape()
        if self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if not 60 <= self.warning_s <= 65535:  # Slurm's --signal takes 0..65535 s, 60 s steps
            raise ConfigError(f"--warning-s must be in [60, 65535], got {self.warning_s}")
        if self.max_requeues < 0:
            raise ConfigError(f"--max-requeues must be >= 0, got {self.max_requeues}")
        if self.time_limit is not None:
            seconds = time_limit_seconds(self.time_limit)
            if seconds <= 2 * self.warning_s:
                raise ConfigError(
                    f"--time {self.time_limit} leaves no time to train: the save warning "
                    f"comes --warning-s {self.warning_s} s before the end (make --time over "
                    f"twice that, or --warning-s shorter)"
                )
        for flag, value in (("--partition", self.partition), ("--account", self.account),
                            ("--qos", self.qos), ("--constraint", self.constraint),
                            ("--job-name", self.job_name)):  # fmt: skip
            if value is not None and (not value.strip() or re.search(r"[\s'\"\\]", value)):
                raise ConfigError(f"{flag} {value!r}: expected one word without quotes")
        for option in self.sbatch_options:
            if not option.startswith("-") or "\n" in option:
                raise ConfigError(
                    f"--sbatch-option {option!r}: expected one sbatch option such as "
                    "--mail-type=END"
                )


def time_limit_seconds(text: str) -> int:
    """Slurm's --time (``90``, ``1:30:00``, ``2-12``, ...) in seconds."""
    match = _TIME.match(text.strip())
    if match is None:
        raise ConfigError(
            f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    if b is not None:  # M:S
        return a * 60 + b
    return a * 60  # M


def render(options: SlurmOptions, config_path: Path, run_dir: Path, workdir: Path) -> str:
    """The batch script for ``megabatch train CONFIG_PATH`` in ``run_dir``."""
    lines = [f"--chdir={workdir}"]  # the config's relative paths mean what they meant here
    if options.time_limit is not None:  # else the partition's default limit
        lines.append(f"--time={options.time_limit}")
    if options.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={options.gpus_per_node}")
    for flag, value in (("--partition", options.partition), ("--account", options.account),
                        ("--qos", options.qos), ("--constraint", options.constraint)):  # fmt: skip
        if value is not None:
            lines.append(f"{flag}={value}")
    lines += options.sbatch_options
    environment = [f"export OMP_NUM_THREADS={options.cpus_per_task}"]
    if options.gpus_per_node == 0:
        environment.append("export DS_ACCELERATOR=cpu  # CPU ranks: gloo, no CUDA")
    fields = {
        "job_name": options.job_name or f"megabatch-{run_dir.name}",
        "nodes": str(options.nodes),
        "tasks_per_node": str(options.ranks_per_node),
        "cpus_per_task": str(options.cpus_per_task),
        "log": str(run_dir / LOG_NAME),
        "warning_s": str(options.warning_s),
        "sbatch_options": "\n".join(f"#SBATCH {line}" for line in lines),
        "environment": "\n".join(environment),
        "python": shlex.quote(options.python),
        "config": shlex.quote(str(config_path)),
        "max_requeues": str(options.max_requeues),
    }
    return fill(template_text(), fields)


def template_text() -> str:
    return deploy_file_text(*TEMPLATE)


def fill(template: str, fields: dict[str, str]) -> str:
    """Replace every ``{{name}}``; a name without a value is an error, not an empty line."""
    missing = sorted(set(_FIELD.findall(template)) - fields.keys())
    if missing:
        raise ValueError(f"template fields without a value: {', '.join(missing)}")
    return _FIELD.sub(lambda m: fields[m.group(1)], template)


def sbatch(script: Path) -> str:
    """Submit ``script``; returns the job id. SubmitError (one line) when sbatch is
    missing or refuses the job."""
    out = run_tool(["sbatch", "--parsable", str(script)],
                   missing=f"sbatch not found on PATH (not a Slurm login node?); the script "
                   f"is {script}: submit it with sbatch, or see --dry-run",
                   refused=f"sbatch refused {script}")  # fmt: skip
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    return out.strip().split(";")[0]
