"""Process-group set-up for torchrun, Slurm's srun, or a single plain process.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under srun
(SLURM_PROCID set, RANK not) those are derived: RANK = SLURM_PROCID, LOCAL_RANK =
SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS, MASTER_ADDR = the first host of
SLURM_JOB_NODELIST (scontrol's expansion, when available), MASTER_PORT from the job id.
A plain process is rank 0 of 1. CPU runs use gloo, GPU runs NCCL. A gloo run across
nodes needs an address the other nodes can reach (``check_gloo_address``).

Collectives wait ``collective_timeout_s`` for each other: beyond that a rank's
``PeerWatch`` (megabatch.trainer.peers) names the peer that stopped answering and ends the run; the
process group's own timeout, a minute longer, is the backstop.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch

from megabatch.trainer.config import ConfigError
from megabatch.trainer.engine import import_deepspeed
from megabatch.trainer.peers import PeerWatch

# How much longer than collective_timeout_s the process group itself waits: the peer
# watch speaks first, with the name of the rank that stopped answering.
BACKEND_TIMEOUT_MARGIN_S = 60.0


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    peers: PeerWatch | None = None  # None for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """``node[01-04,07]`` -> ``node01``; ``a,b`` -> ``a``. scontrol's own expansion is
    used when it is installed; this covers the common single-bracket form without it."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=False)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    match = re.match(r"^([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_to_torch_env(env: dict[str, str]) -> dict[str, str]:
    """The torch variables an srun task needs, derived from Slurm's (empty if not srun)."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    job = int(env.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "MASTER_ADDR": env.get("MASTER_ADDR")
        or first_host(env.get("SLURM_JOB_NODELIST", "localhost")),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000),
    }


def check_gloo_address(env: dict[str, str]) -> None:
    """Raise ConfigError when a gloo run spans nodes and gloo would listen on loopback.

    Without GLOO_SOCKET_IFNAME, gloo binds to the address this host's name resolves to.
    Where that is a loopback address (Debian's /etc/hosts maps the name to 127.0.1.1;
    network namespaces share one /etc/hosts), the other nodes cannot connect and the
    process group fails only after its connect retries, with "Connection refused" from
    127.0.0.1: said here, before, with the fix."""
    nodes = int(env.get("GROUP_WORLD_SIZE") or env.get("SLURM_NNODES") or 1)  # torchrun, srun
    if nodes < 2 or env.get("GLOO_SOCKET_IFNAME"):
        return
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return  # gloo fails on its own, naming the host
    if ipaddress.ip_address(address).is_loopback:
        raise ConfigError(
            f"this gloo run spans {nodes} nodes, but this host's name {name!r} resolves to "
            f"{address}, which the other nodes cannot reach: set GLOO_SOCKET_IFNAME to the "
            "network interface that joins the nodes (e.g. eth0)"
        )


def init_world(collective_timeout_s: float = 600.0) -> World:
    """Initialise the default process group (every run, one rank included: DeepSpeed
    needs one), pick this rank's device and, with several ranks, start the peer watch."""
    os.environ.update(slurm_to_torch_env(dict(os.environ)))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        check_gloo_address(dict(os.environ))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    deepspeed = import_deepspeed()
    timeout = timedelta(seconds=collective_timeout_s + BACKEND_TIMEOUT_MARGIN_S)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    peers = None
    if world_size > 1:
        peers = PeerWatch(rank, world_size, collective_timeout_s, os.environ["MASTER_ADDR"],
                          int(os.environ["MASTER_PORT"]))  # fmt: skip
        peers.start()
    return World(rank, world_size, local_rank, device, peers)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
