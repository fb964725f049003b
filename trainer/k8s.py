"""``megabatch submit k8s``: the Kubernetes objects of one training job, built from the
options and the resolved config.

Two flavours of the same pod (the ``node`` container of deploy/k8s/megabatch-runtime.yaml:
``megabatch launch train /etc/megabatch/config.yaml`` under torchrun, which reads the
PET_* rendezvous variables):

- ``kubeflow``: a Kubeflow Trainer v2 ``TrainJob`` referencing that ClusterTrainingRuntime
  (installed once per cluster); Kubeflow's torch plugin injects PET_*. A save after a stop
  signal (exit 75) restarts the whole JobSet, uncounted.
- ``core``: an Indexed ``Job`` and a headless ``Service`` (no operator needed); the Job
  sets PET_* itself, and its pod failure policy replaces a pod that exited 75, uncounted.

Both get a ``ConfigMap`` holding the resolved config and, with metrics.prometheus=true, a
Prometheus Operator ``PodMonitor``. The config holds the paths the pods see: the run
directory on the runs volume claim, the data on the data claim (or the runs claim).
docs/deploy.md tells the whole path and why.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from megabatch.trainer.config import RunConfig
from megabatch.trainer.k8s_options import K8sOptions, job_name, node_selector, run_name, tolerations
from megabatch.trainer.k8s_runtime import (
    CONFIG_MOUNT,
    CONFIG_PATH,
    CONTAINER,
    metrics_port_name,
    runtime_node_job,
    runtime_path,
)
from megabatch.trainer.stop_signals import EXIT_REQUEUE
from megabatch.trainer.submission import run_tool

KUBERNETES_VERSION = "1.33"
"""The oldest Kubernetes the objects are written for, and the schema version the tests
validate them against: every field they use is GA there (the Job's pod failure policy
since 1.31, backoffLimitPerIndex and maxFailedIndexes since 1.33)."""
MASTER_PORT = 29500
"""torchrun's rendezvous port on node 0: Kubeflow's (its ContainerTrainerPort); the core
flavour uses the same."""
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
"""The pod's index in an Indexed Job: PET_NODE_RANK (as Kubeflow's torch plugin sets it)."""
RUNTIME_PATCH_MANAGER = "megabatch/submit"
"""Who owns the TrainJob's runtime patch (Kubeflow wants a domain-prefixed path)."""
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANIFESTS_DIR = "k8s"
"""Under RUN/submit/: the manifests, and nothing else (``kubectl apply -f`` takes it whole)."""
PODMONITOR_FILE = "podmonitor.yaml"


def master_address(name: str, flavour: str) -> str:
    """Node 0's DNS name in the job's headless service: what PET_MASTER_ADDR holds."""
    if flavour == "kubeflow":
        return f"{name}-{CONTAINER}-0-0.{name}"  # JobSet's pod host name and subdomain
    return f"{name}-0.{name}"  # the Indexed Job's host name, the Service as subdomain


def pod_selector_label(flavour: str) -> str:
    """The label its controller puts on every pod of the job, valued the job's name."""
    return "jobset.sigs.k8s.io/jobset-name" if flavour == "kubeflow" else "batch.kubernetes.io/job-name"  # fmt: skip


def container_command(options: K8sOptions) -> list[str]:
    """What the ``node`` container runs (the runtime's command, with the job's
    --shutdown-timeout): torchrun's rendezvous comes from PET_*."""
    return ["megabatch", "launch", f"--shutdown-timeout={options.shutdown_timeout_s}", "train",
            CONFIG_PATH]  # fmt: skip


# --------------------------------------------------------------------------- the objects
@dataclass(frozen=True)
class Manifest:
    filename: str
    obj: dict


def build_manifests(options: K8sOptions, config: RunConfig, config_text: str) -> list[Manifest]:
    """The job's objects, in the order to apply them (the ConfigMap before the pods that
    mount it; the PodMonitor, which needs the Prometheus Operator, last)."""
    name = job_name(options, config)
    parts = _Parts(options, config, name)
    manifests = [Manifest("configmap.yaml", parts.configmap(config_text))]
    if options.flavour == "kubeflow":
        manifests.append(Manifest("trainjob.yaml", parts.trainjob()))
    else:
        manifests += [Manifest("service.yaml", parts.service()), Manifest("job.yaml", parts.job())]
    if config.metrics.prometheus:
        manifests.append(Manifest(PODMONITOR_FILE, parts.podmonitor()))
    return manifests


@dataclass
class _Parts:
    options: K8sOptions
    config: RunConfig
    name: str

    def metadata(self, name: str | None = None) -> dict:
        meta = {"name": name or self.name, "labels": self.labels()}
        if self.options.namespace is not None:
            meta["namespace"] = self.options.namespace
        return meta

    def labels(self) -> dict:
        return {NAME_LABEL: "megabatch", INSTANCE_LABEL: self.name}

    # ---- shared by both flavours
    def configmap(self, text: str) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self.metadata(self.config_map_name),
                "data": {"config.yaml": text}}  # fmt: skip

    @property
    def config_map_name(self) -> str:
        return f"{self.name}-config"

    def volumes(self) -> list[dict]:
        o = self.options
        volumes = [{"name": "config", "configMap": {"name": self.config_map_name}},
                   {"name": "runs", "persistentVolumeClaim": {"claimName": o.runs_claim}}]  # fmt: skip
        if o.data_claim is not None:  # read-only: the pods never write the shards
            volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": o.data_claim, "readOnly": True}})  # fmt: skip
        return volumes

    def volume_mounts(self) -> list[dict]:
        o = self.options
        mounts = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                  {"name": "runs", "mountPath": o.runs_mount}]  # fmt: skip
        if o.data_claim is not None:
            mounts.append({"name": "data", "mountPath": o.data_mount, "readOnly": True})
        return mounts

    def resources(self) -> dict | None:
        """Requests = limits: a pod that gets what it asked for is evicted last."""
        o = self.options
        wanted = {"cpu": o.cpu, "memory": o.memory}
        if o.gpus_per_node > 0:
            wanted[o.gpu_resource] = str(o.gpus_per_node)
        wanted = {k: v for k, v in wanted.items() if v is not None}
        return {"limits": dict(wanted), "requests": dict(wanted)} if wanted else None

    def env(self) -> list[dict]:
        env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]  # kubectl logs as it happens
        if self.options.gpus_per_node == 0:
            env.append({"name": "DS_ACCELERATOR", "value": "cpu"})  # CPU ranks: gloo
        return env

    def placement(self) -> dict:
        """The pod spec's node selector, tolerations and grace period."""
        spec: dict = {"terminationGracePeriodSeconds": self.options.grace_s}
        selected = node_selector(self.options.node_selector)
        if selected:
            spec["nodeSelector"] = selected
        tolerated = tolerations(self.options.tolerations)
        if tolerated:
            spec["tolerations"] = tolerated
        return spec

    def podmonitor(self) -> dict:
        run = run_name(self.config)
        # The labels the rules and the dashboard group by, as file_sd gives them.
        relabelings = [{"action": "replace", "targetLabel": "run", "replacement": run},
                       {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_name"],
                        "targetLabel": "node"}]  # fmt: skip
        endpoints = [{"port": metrics_port_name(k), "path": "/metrics", "honorLabels": True,
                      "relabelings": relabelings} for k in range(self.options.ranks_per_node)]  # fmt: skip
        metadata = self.metadata()
        metadata["labels"].update(node_selector(self.options.podmonitor_labels, "--podmonitor-label"))  # fmt: skip
        selector = {"matchLabels": {pod_selector_label(self.options.flavour): self.name}}
        # job="megabatch", as deploy/prometheus/prometheus.yml's scrape job names it: the
        # rules select it (the operator's default would be NAMESPACE/PODMONITOR).
        spec = {"jobLabel": NAME_LABEL, "selector": selector, "podMetricsEndpoints": endpoints}
        return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": metadata,
                "spec": spec}  # fmt: skip

    # ---- kubeflow
    def trainjob(self) -> dict:
        o = self.options
        trainer = {"image": o.image, "command": container_command(o), "numNodes": o.nodes,
                   "numProcPerNode": o.ranks_per_node, "env": self.env()}  # fmt: skip
        if self.resources() is not None:
            trainer["resourcesPerNode"] = self.resources()
        pod_spec = {**self.placement(), "volumes": self.volumes(),
                    "containers": [{"name": CONTAINER, "volumeMounts": self.volume_mounts()}]}  # fmt: skip
        patch = {"manager": RUNTIME_PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": CONTAINER, "template": {"spec": {"template": {
                "metadata": {"labels": self.labels()}, "spec": pod_spec}}}}]}}}}  # fmt: skip
        runtime_ref = {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": o.runtime}  # fmt: skip
        return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": self.metadata(),
                "spec": {"runtimeRef": runtime_ref, "trainer": trainer, "runtimePatches": [patch]}}  # fmt: skip

    # ---- core
    def service(self) -> dict:
        """Headless: it only gives each pod a DNS name, NAME-INDEX.NAME, before it is ready."""
        return {"apiVersion": "v1", "kind": "Service", "metadata": self.metadata(), "spec": {
            "clusterIP": "None", "publishNotReadyAddresses": True,
            "selector": {pod_selector_label("core"): self.name},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}]}}  # fmt: skip

    def job(self) -> dict:
        o = self.options
        rules = [
            _exit_rule("Ignore", [EXIT_REQUEUE]),  # saved: a new pod resumes, uncounted
            _disruption_rule("Ignore"),  # evicted, preempted: the same, from the last save
            _exit_rule("FailJob", [2]),  # bad config or input: the same on every try
        ]
        spec = {"completionMode": "Indexed", "completions": o.nodes, "parallelism": o.nodes,
                "backoffLimitPerIndex": o.restarts, "maxFailedIndexes": 0,
                "podReplacementPolicy": "Failed", "podFailurePolicy": {"rules": rules},
                "template": {"metadata": {"labels": self.labels()}, "spec": self.core_pod_spec()}}  # fmt: skip
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": self.metadata(), "spec": spec}

    def core_pod_spec(self) -> dict:
        """The runtime's pod, with what Kubeflow would add to it: this job's image,
        command, PET_* and resources, its volumes and placement."""
        o = self.options
        pod = copy.deepcopy(runtime_node_job()["spec"]["template"]["spec"])
        (container,) = pod["containers"]
        container.update(image=o.image, command=container_command(o),
                         env=self.env() + self.pet_env(), volumeMounts=container["volumeMounts"] + self.volume_mounts(),
                         ports=[{"name": metrics_port_name(k), "containerPort": self.config.metrics.port + k}
                                for k in range(o.ranks_per_node)])  # fmt: skip
        if o.image_pull_policy is not None:
            container["imagePullPolicy"] = o.image_pull_policy
        if self.resources() is not None:
            container["resources"] = self.resources()
        pod.update(self.placement(), subdomain=self.name, volumes=pod["volumes"] + self.volumes())
        return pod

    def pet_env(self) -> list[dict]:
        """torchrun's rendezvous, as Kubeflow's torch plugin sets it for a TrainJob."""
        o = self.options
        return [{"name": "PET_NNODES", "value": str(o.nodes)},
                {"name": "PET_NPROC_PER_NODE", "value": str(o.ranks_per_node)},
                {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
                {"name": "PET_MASTER_ADDR", "value": master_address(self.name, "core")},
                {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)}]  # fmt: skip


def _exit_rule(action: str, codes: list[int]) -> dict:
    return {"action": action, "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": codes}}  # fmt: skip


def _disruption_rule(action: str) -> dict:
    return {"action": action, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}  # fmt: skip


# --------------------------------------------------------------------------- YAML
class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings (the ConfigMap's config reads as YAML), and
    every shared value written out in full (no &anchors: what kubectl shows)."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def manifest_text(manifest: Manifest, header: str) -> str:
    """The object as a YAML document, ``header`` as comment lines on top."""
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.dump(manifest.obj, Dumper=_Dumper, sort_keys=False, width=100)


# --------------------------------------------------------------------------- the cluster
def apply_command(files: list[Path]) -> list[str]:
    return ["kubectl", "apply", *(arg for path in files for arg in ("-f", str(path)))]


def check_kubectl(folder: Path) -> None:
    """SubmitError (one line) unless kubectl is here and has a cluster to talk to."""
    run_tool(["kubectl", "config", "current-context"],
             missing=f"kubectl not found on PATH; the manifests are in {folder}: apply them "
             "with kubectl apply where a cluster is configured",
             refused=f"kubectl has no cluster to apply to (the manifests are in {folder}); "
             "kubectl config current-context")  # fmt: skip


def kubectl_apply(files: list[Path]) -> str:
    """``kubectl apply -f ...``; what it said (one line per object). SubmitError: its
    refusal's first line."""
    return run_tool(apply_command(files), missing="kubectl not found on PATH",
                    refused=f"kubectl apply refused {', '.join(p.name for p in files)}")  # fmt: skip


def follow_commands(options: K8sOptions, config: RunConfig) -> dict[str, str]:
    """How to watch the job once applied: its state, its pods, node 0's log, the run's
    status (megabatch status, run in the pod: the run directory is on the claim)."""
    name = job_name(options, config)
    kubectl = "kubectl" + (f" -n {options.namespace}" if options.namespace else "")
    kind = "trainjob" if options.flavour == "kubeflow" else "job"
    node0 = f"job/{name}-{CONTAINER}-0" if options.flavour == "kubeflow" else f"job/{name}"
    return {
        "state": f"{kubectl} get {kind} {name}; {kubectl} get pods -l {pod_selector_label(options.flavour)}={name}",
        "log": f"{kubectl} logs -f {node0}",
        "status": f"{kubectl} exec {node0} -- megabatch status {config.run_dir}",
        "stop": f"{kubectl} delete {kind} {name}",
    }  # fmt: skip


def prerequisites(options: K8sOptions, config: RunConfig) -> str:
    """What the cluster must have before the manifests apply (lines, or "")."""
    claims = " and ".join(c for c in (options.runs_claim, options.data_claim) if c)
    lines = [f"the PersistentVolumeClaim(s) {claims} must exist in the job's namespace"]
    if options.flavour == "kubeflow":
        install = f": kubectl apply -f {runtime_path()}" if options.runtime == "megabatch" else ""
        lines.append(f"the TrainJob needs Kubeflow Trainer v2 and the ClusterTrainingRuntime "
                     f"{options.runtime}, once per cluster{install}")  # fmt: skip
    if config.metrics.prometheus:
        lines.append("the PodMonitor needs the Prometheus Operator (monitoring.coreos.com/v1)")
    return "".join(f"{line}\n" for line in lines)
