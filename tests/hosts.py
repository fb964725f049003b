"""Two hosts on this machine, for the multi-node tests: two network namespaces joined by
a veth pair, each with its loopback and one interface named ``mb0`` holding a private
address that exists only inside this sandbox (10.213.0.1 and 10.213.0.2/24; each pair is
a network of its own, so parallel test workers' pairs never meet). Nothing is routed out
of them: a process started in a host reaches the other host and its own loopback,
nothing else. The file system is shared, as a cluster's network file system would be.

Processes run in a host with ``ip netns exec``; ``Host.kill`` SIGKILLs every process
in it (``ip netns pids``), and ``Host.cut``/``Host.reconnect`` take its link down and up
again, so a host can be lost without a word (no TCP reset reaches its peers), as a
machine that loses power is. Needs root and iproute2 (``.ci/run`` installs it); the
tests that use it skip without, unless MEGABATCH_REQUIRE_NETNS=1 (set by ``.ci/run``)
makes that a failure."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

INTERFACE = "mb0"  # the same name on both hosts, as eth0 would be on a cluster's nodes
PREFIX_LENGTH = 24


def missing() -> str | None:
    """Why no hosts can be made here (None if they can)."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _ip(*argv: str) -> str:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str  # on INTERFACE

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def pids(self) -> list[int]:
        return [int(pid) for pid in _ip("netns", "pids", self.namespace).split()]

    def kill(self) -> None:
        """SIGKILL every process on this host."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def bytes_sent(self) -> int:
        """Bytes this host has sent over its link."""
        return int(_ip("-n", self.namespace, "-s", "link", "show", INTERFACE).split("TX:")[1]
                   .splitlines()[1].split()[0])  # fmt: skip

    def cut(self) -> None:
        """Take this host's link down: its peers' packets go nowhere, and no reset comes back."""
        _ip("-n", self.namespace, "link", "set", INTERFACE, "down")

    def reconnect(self) -> None:
        _ip("-n", self.namespace, "link", "set", INTERFACE, "up")


class TwoHosts:
    """``with TwoHosts() as (first, second): ...``; the namespaces and whatever still runs
    in them are gone after."""

    def __init__(self):
        names = (f"mb{os.getpid()}a", f"mb{os.getpid()}b")  # unique on this machine
        self.hosts = tuple(Host(name, f"10.213.0.{i + 1}") for i, name in enumerate(names))

    def __enter__(self) -> tuple[Host, Host]:
        try:
            for host in self.hosts:
                _ip("netns", "add", host.namespace)
                _ip("-n", host.namespace, "link", "set", "lo", "up")
            # The pair is made in the first host and one end moved to the second; both ends
            # then take the same name (names are per namespace).
            first, second = self.hosts
            _ip("-n", first.namespace, "link", "add", INTERFACE, "type", "veth",
                "peer", "name", "mbpeer", "netns", second.namespace)  # fmt: skip
            _ip("-n", second.namespace, "link", "set", "mbpeer", "name", INTERFACE)
            for host in self.hosts:
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/{PREFIX_LENGTH}",
                    "dev", INTERFACE)  # fmt: skip
                _ip("-n", host.namespace, "link", "set", INTERFACE, "up")
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            if host.namespace in _ip("netns", "list").split():
                host.kill()
                _ip("netns", "del", host.namespace)
