"""The ClusterTrainingRuntime shipped in deploy/k8s/megabatch-runtime.yaml, read: the
Kubeflow flavour's TrainJobs run its pod, and the core flavour's Job is built from the
same pod, so that both run one container (the ``node`` container: ``megabatch launch
train`` on the resolved config, under torchrun)."""

from __future__ import annotations

from importlib import resources

import yaml

from megabatch.trainer.prometheus import CONTAINER_PORT_NAME
from megabatch.trainer.submission import deploy_file_text

RUNTIME_FILE = ("k8s", "megabatch-runtime.yaml")
"""Where the runtime lives in ``megabatch.deploy``."""
CONTAINER = "node"
"""The trainer container's name, and the replicated job's: Kubeflow's torch plugin injects
PET_* into the container of that name (and the failure rules name it)."""
CONFIG_MOUNT = "/etc/megabatch"
CONFIG_PATH = f"{CONFIG_MOUNT}/config.yaml"
"""Where the pods read the resolved config (the job's ConfigMap, ``config.yaml``)."""


def runtime() -> dict:
    """The shipped ClusterTrainingRuntime (deploy/k8s/megabatch-runtime.yaml)."""
    return yaml.safe_load(deploy_file_text(*RUNTIME_FILE))


def runtime_path() -> str:
    """Where the installed runtime file is, for ``kubectl apply -f``."""
    return str(resources.files("megabatch.deploy").joinpath(*RUNTIME_FILE))


def runtime_node_job(runtime_obj: dict | None = None) -> dict:
    """The runtime's ``node`` replicated job template (a Job template)."""
    jobs = (runtime_obj or runtime())["spec"]["template"]["spec"]["replicatedJobs"]
    (node,) = [job for job in jobs if job["name"] == CONTAINER]
    return node["template"]


def runtime_container(runtime_obj: dict | None = None) -> dict:
    pod = runtime_node_job(runtime_obj)["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == CONTAINER]
    return container


def runtime_metrics_ports() -> list[tuple[str, int]]:
    """(name, port) of the metrics ports the runtime's container declares, local rank order."""
    ports = {p["name"]: p["containerPort"] for p in runtime_container().get("ports", [])}
    found, k = [], 0
    while metrics_port_name(k) in ports:
        found.append((metrics_port_name(k), ports[metrics_port_name(k)]))
        k += 1
    return found


def runtime_max_restarts() -> int:
    return runtime()["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"]


def metrics_port_name(local_rank: int) -> str:
    """The container port of local rank ``local_rank``'s metrics (a port name is at most 15
    characters: metrics, metrics-1, ...)."""
    return CONTAINER_PORT_NAME if local_rank == 0 else f"{CONTAINER_PORT_NAME}-{local_rank}"
