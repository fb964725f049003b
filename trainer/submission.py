"""What every scheduler of ``megabatch submit`` shares: the job's shape (nodes x ranks per
node, and so the world size the config is checked for) and handing the job to the
scheduler's own tool (sbatch, kubectl), whose absence or refusal is one line."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources

from megabatch.trainer.config import ConfigError


@dataclass
class JobShape:
    """Nodes, GPUs per node and ranks per node: what the world size is made of."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    """Ranks per node: the GPUs per node, or 1 for a CPU job, unless given."""

    TASKS_FLAG = "--tasks-per-node"
    """How the scheduler's command spells ``tasks_per_node`` (its error messages name it)."""

    @property
    def ranks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def check_shape(self) -> None:
        """One-line ConfigError for a shape no job can have."""
        for flag, value in (("--nodes", self.nodes), (self.TASKS_FLAG, self.ranks_per_node)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")


class SubmitError(RuntimeError):
    """The scheduler could not take the job (its tool missing, or its refusal)."""


def run_tool(argv: list[str], missing: str, refused: str, timeout: float = 120) -> str:
    """Run the scheduler's tool; its stdout. SubmitError when it is not on PATH
    (``missing``, the whole message) or exits non-zero (``refused``, then the first line
    the tool said)."""
    if shutil.which(argv[0]) is None:
        raise SubmitError(missing)
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"
        raise SubmitError(f"{refused}: {said.splitlines()[0]}")
    return done.stdout


def deploy_file_text(*parts: str) -> str:
    """A file installed with megabatch as ``megabatch.deploy`` (the repository's deploy/
    folder): the job templates, found in any install."""
    return resources.files("megabatch.deploy").joinpath(*parts).read_text(encoding="utf-8")
