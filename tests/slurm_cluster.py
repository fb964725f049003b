"""A real single-node Slurm for the tests: Debian's munged, slurmctld and slurmd, started
as root without systemd in a folder of their own (config, keys, state, logs), on free
loopback ports, and shut down after. ``.ci/run`` installs the packages; elsewhere the
tests that need it skip without them, unless MEGABATCH_REQUIRE_SLURM=1 (set by
``.ci/run``) makes their absence a failure.

Client commands (sbatch, squeue, scontrol, scancel) find this cluster through
SLURM_CONF, which ``SlurmCluster.env`` sets; jobs inherit it (sbatch exports the
submitting environment), so the ranks' own ``scontrol`` calls reach it too."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
# The daemons live in /usr/sbin, which a non-login PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def missing() -> str | None:
    """Why no cluster can start here (None if one can)."""
    absent = [name for name in (*DAEMONS, *COMMANDS) if _which(name) is None]
    if absent:
        return f"Slurm not installed ({', '.join(absent)} missing; .ci/run installs it)"
    if os.geteuid() != 0:
        return "slurmd must run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One controller and one node, ``host``, with every CPU of this machine."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.host = socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        self.munge_socket = folder / "munge" / "munge.sock"

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        f = self.folder
        for sub in ("munge", "state", "spool", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        f.chmod(0o700)  # munged refuses a key or socket others could reach
        (f / "munge").chmod(0o700)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self.conf.write_text(self._config())
        # --force: the folder sits in /tmp, which others may write to (sticky).
        self._run([_which("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                   f"--log-file={f / 'log' / 'munged.log'}", f"--pid-file={f / 'munge' / 'munged.pid'}",
                   f"--seed-file={f / 'munge' / 'seed'}"])  # fmt: skip
        self._run([_which("slurmctld"), "-i", "-f", str(self.conf)])  # -i: no state from before
        self._run([_which("slurmd"), "-f", str(self.conf)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.command("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not come up within {timeout_s} s (node state "
                           f"{state!r}):\n{self.logs()}")  # fmt: skip

    def _config(self) -> str:
        f = self.folder
        return "\n".join([
            "ClusterName=megabatch-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "CredType=cred/munge",
            f"StateSaveLocation={f / 'state'}",
            f"SlurmdSpoolDir={f / 'spool'}",
            f"SlurmctldPidFile={f / 'slurmctld.pid'}",
            f"SlurmdPidFile={f / 'slurmd.pid'}",
            f"SlurmctldLogFile={f / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={f / 'log' / 'slurmd.log'}",
            # No cgroups here (no systemd): processes tracked by their parentage.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "InactiveLimit=0",
            "KillWait=30",
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the assertions
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
            # Two jobs may share the CPUs: the tests run an uninterrupted and a preempted
            # job side by side.
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE:2",
        ]) + "\n"  # fmt: skip

    def command(self, *argv: str, check: bool = True, timeout: float = 30):
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s KEY=VALUE fields."""
        out = self.command("scontrol", "-o", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def logs(self) -> str:
        parts = []
        for log in sorted((self.folder / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is left (a failed test's jobs) and wait for it to go, then stop
        the daemons. A controller shut down under a job still ending leaves its step
        daemon retrying forever, and slurmd waiting for it: whatever is left of this
        cluster after that (found by its open files and folders) is killed."""
        self.command("scancel", "--full", "--user=root", check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.command("squeue", "-h", check=False).stdout.strip():
                break
            time.sleep(0.5)
        self.command("scontrol", "shutdown", check=False)
        subprocess.run([_which("munged"), "--stop", f"--socket={self.munge_socket}"],
                       capture_output=True, timeout=30, check=False)  # fmt: skip
        deadline = time.monotonic() + 30
        while self._processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self._processes():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def _processes(self) -> list[int]:
        """This cluster's live processes: those with a file or working folder in it."""
        mine, root = [], str(self.folder)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                links = [os.readlink(entry / "cwd")]
                links += [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            except OSError:  # gone, or not ours to read
                continue
            if any(link.startswith(root) for link in links):
                mine.append(int(entry.name))
        return mine

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} did not start ({done.returncode}): "
                               f"{done.stderr.strip()}\n{self.logs()}")  # fmt: skip
