"""``megabatch submit k8s``'s options, and the config checked against them: the paths the
pods see (their volumes), names Kubernetes accepts, a grace period that outlasts the save.
What only the pods can check (the shards, a checkpoint in the run directory) they check
when they start, as every rank does."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from megabatch.trainer.config import ConfigError, RunConfig
from megabatch.trainer.k8s_runtime import (
    CONFIG_MOUNT,
    CONTAINER,
    runtime_max_restarts,
    runtime_metrics_ports,
)
from megabatch.trainer.submission import JobShape
from megabatch.trainer.torchrun import DEFAULT_SHUTDOWN_TIMEOUT_S

FLAVOURS = ("kubeflow", "core")
GRACE_MARGIN_S = 60
"""Default seconds between torchrun's SIGKILL of the ranks (--shutdown-timeout-s after the
signal) and the kubelet's (terminationGracePeriodSeconds): the launcher's own exit."""
MIN_GRACE_MARGIN_S = 10
GPU_RESOURCE = "nvidia.com/gpu"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Kubernetes' own quantity pattern (apimachinery resource.Quantity): 8, 500m, 64Gi, 1e3.
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_LOOPBACK = ("127.", "localhost", "::1")


@dataclass
class K8sOptions(JobShape):
    """The job's shape, image, volumes and placement (``megabatch submit k8s --help``)."""

    TASKS_FLAG = "--procs-per-node"

    image: str = ""
    flavour: str = "kubeflow"
    namespace: str | None = None
    """None: kubectl's current namespace (the manifests name none)."""
    job_name: str | None = None
    """None: megabatch-RUN, made a DNS label."""
    runtime: str = "megabatch"
    """The ClusterTrainingRuntime the TrainJob references (kubeflow flavour)."""
    runs_claim: str = ""
    runs_mount: str = "/runs"
    data_claim: str | None = None
    data_mount: str = "/data"
    cpu: str | None = None
    memory: str | None = None
    gpu_resource: str = GPU_RESOURCE
    node_selector: list[str] = field(default_factory=list)
    """KEY=VALUE each."""
    tolerations: list[str] = field(default_factory=list)
    """KEY[=VALUE][:EFFECT] each."""
    image_pull_policy: str | None = None
    podmonitor_labels: list[str] = field(default_factory=list)
    """KEY=VALUE each: what the Prometheus's podMonitorSelector looks for."""
    shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S
    grace_period_s: int | None = None
    """None: shutdown_timeout_s + GRACE_MARGIN_S."""
    max_restarts: int | None = None
    """Restarts after failures other than a save (exit 75); None: the runtime's."""

    @property
    def grace_s(self) -> int:
        if self.grace_period_s is not None:
            return self.grace_period_s
        return self.shutdown_timeout_s + GRACE_MARGIN_S

    @property
    def restarts(self) -> int:
        if self.max_restarts is not None:
            return self.max_restarts
        return runtime_max_restarts()

    def check(self) -> None:
        """One-line ConfigError for an option the cluster would refuse or that could not
        work; the config is checked against them by ``check_config_for_pods``."""
        self.check_shape()
        if self.flavour not in FLAVOURS:
            raise ConfigError(f"--flavour must be one of {', '.join(FLAVOURS)}, got {self.flavour!r}")  # fmt: skip
        if not self.image:
            raise ConfigError("--image is required: the container image with megabatch installed")
        if re.search(r"\s", self.image):
            raise ConfigError(f"--image {self.image!r}: expected an image reference such as registry/megabatch:1.0")  # fmt: skip
        if self.job_name is not None:
            _check_name("--job-name", self.job_name, _DNS_1035, 63, "a DNS label starting with a letter")  # fmt: skip
            longest = longest_host_name(self.job_name, self.flavour, self.nodes)
            if len(longest) > 63:
                raise ConfigError(f"--job-name {self.job_name!r}: too long for {self.nodes} node(s): "
                                  f"the pod host name {longest} is over 63 characters")  # fmt: skip
        if self.namespace is not None:
            _check_name("--namespace", self.namespace, _DNS_LABEL, 63, "a DNS label")
        _check_name("--runtime", self.runtime, _SUBDOMAIN, 253, "a DNS subdomain")
        if not self.runs_claim:
            raise ConfigError("--runs-claim is required: the PersistentVolumeClaim that holds "
                              "the run directory (checkpoints must outlive the pods)")  # fmt: skip
        for flag, claim in (("--runs-claim", self.runs_claim), ("--data-claim", self.data_claim)):
            if claim is not None:
                _check_name(flag, claim, _SUBDOMAIN, 253, "a PersistentVolumeClaim name")
        self._check_mounts()
        for flag, value in (("--cpu", self.cpu), ("--memory", self.memory)):
            if value is not None and not _QUANTITY.match(value):
                raise ConfigError(f"{flag} {value!r}: expected a Kubernetes quantity such as 8, 500m or 64Gi")  # fmt: skip
        _check_qualified_name("--gpu-resource", self.gpu_resource)
        node_selector(self.node_selector, "--node-selector")
        node_selector(self.podmonitor_labels, "--podmonitor-label")
        tolerations(self.tolerations)
        if self.image_pull_policy is not None:
            if self.image_pull_policy not in PULL_POLICIES:
                raise ConfigError(f"--image-pull-policy must be one of {', '.join(PULL_POLICIES)}, "
                                  f"got {self.image_pull_policy!r}")  # fmt: skip
            if self.flavour == "kubeflow":
                raise ConfigError("--image-pull-policy: a TrainJob cannot set it (Kubernetes' "
                                  "default applies: Always for :latest, else IfNotPresent); "
                                  "use --flavour core, or set it in the runtime")  # fmt: skip
        self._check_timing()

    def _check_mounts(self) -> None:
        given = [("--runs-mount", self.runs_mount)]
        if self.data_claim is not None:
            given.append(("--data-mount", self.data_mount))
        for flag, path in given:
            if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
                raise ConfigError(f"{flag} {path!r}: expected an absolute, normalised folder other than /")  # fmt: skip
        mounts = [*given, ("the config's folder", CONFIG_MOUNT), ("the data workers' /dev/shm", "/dev/shm")]  # fmt: skip
        for i, (what, path) in enumerate(mounts):
            for other_what, other in mounts[i + 1 :]:
                if _under(path, other) or _under(other, path):
                    raise ConfigError(f"{what} {path} and {other_what} {other} overlap: each "
                                      "volume needs a folder of its own")  # fmt: skip

    def _check_timing(self) -> None:
        if self.shutdown_timeout_s < 1:
            raise ConfigError(f"--shutdown-timeout-s must be >= 1, got {self.shutdown_timeout_s}")
        if self.grace_s < self.shutdown_timeout_s + MIN_GRACE_MARGIN_S:
            raise ConfigError(
                f"--grace-period-s {self.grace_s} must exceed --shutdown-timeout-s "
                f"{self.shutdown_timeout_s} by {MIN_GRACE_MARGIN_S} s or more: the kubelet's "
                "SIGKILL must come after torchrun's, once the ranks had their time to save"
            )
        if self.max_restarts is not None:
            if self.max_restarts < 0:
                raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
            if self.flavour == "kubeflow" and self.max_restarts != runtime_max_restarts():
                raise ConfigError(
                    f"--max-restarts {self.max_restarts}: the kubeflow flavour takes it from "
                    f"the runtime's failurePolicy.maxRestarts ({runtime_max_restarts()}; "
                    "deploy/k8s/megabatch-runtime.yaml): edit the runtime, or use --flavour core"
                )


def check_config_for_pods(config: RunConfig, options: K8sOptions) -> None:
    """ConfigError (one line naming the key) for a config the pods could not run as it is:
    a path outside the volumes they mount, a run directory not on the runs claim, metrics
    Prometheus cannot reach. What is in the files (shards, checkpoints) the pods check
    themselves when they start, as every rank does."""
    runs = options.runs_mount
    if not _under(config.run_dir, runs) or posixpath.normpath(config.run_dir) == runs:
        raise ConfigError(
            f"run_dir {config.run_dir}: the pods write the run on the runs claim, mounted at "
            f"{runs} (--runs-mount): give run_dir={runs}/NAME"
        )
    mounts = [runs] + ([options.data_mount] if options.data_claim is not None else [])
    for key, path in _config_paths(config):
        if not any(_under(path, mount) for mount in mounts):
            where = " or ".join(mounts)
            hint = "" if options.data_claim is not None else " (no --data-claim given)"
            raise ConfigError(f"{key} {path}: the pods see only the volumes mounted at "
                              f"{where}{hint}; give the path they have there")  # fmt: skip
    metrics = config.metrics
    if metrics.prometheus:
        if metrics.address.startswith(_LOOPBACK):
            raise ConfigError(
                f"metrics.address {metrics.address}: Prometheus scrapes the pod's address, "
                "so the ranks must listen on it: set metrics.address=0.0.0.0"
            )
        if options.flavour == "kubeflow":
            ports = runtime_metrics_ports()
            wanted = [metrics.port + k for k in range(options.ranks_per_node)]
            if [p for _, p in ports[: len(wanted)]] != wanted:
                raise ConfigError(
                    f"metrics.port {metrics.port} with {options.ranks_per_node} rank(s) per node: "
                    f"the runtime declares ports {ports[0][1]}-{ports[-1][1]} for local ranks "
                    f"0-{len(ports) - 1} (deploy/k8s/megabatch-runtime.yaml): use "
                    f"metrics.port={ports[0][1]}, or --flavour core"
                )


def _config_paths(config: RunConfig):
    """(key, path) for every file or folder the config names; ``pipe:`` commands aside."""
    data = config.data
    for key, spec in (("data.train", data.train), ("data.val", data.val)):
        for item in _shard_items(spec):
            yield key, item
    for key, value in (("data.tokenizer", data.tokenizer), ("data.classnames", data.classnames),
                       ("data.templates", data.templates)):  # fmt: skip
        if value is not None:
            yield key, value
    if config.train.resume not in ("auto", "none"):
        yield "train.resume", config.train.resume


def _shard_items(spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [] if spec.startswith("pipe:") else [spec]
    items = []
    for entry in spec:  # a list of specifications, or of weighted sources
        items += _shard_items(entry.get("shards") if isinstance(entry, dict) else entry)
    return items


def _under(path: str, folder: str) -> bool:
    """Absolute ``path`` is ``folder`` or inside it (``..`` taken into account)."""
    path = str(path)
    return path.startswith("/") and PurePosixPath(posixpath.normpath(path)).is_relative_to(folder)


# --------------------------------------------------------------------------- names
def job_name(options: K8sOptions, config: RunConfig) -> str:
    """``--job-name``, or megabatch-RUN as a DNS label short enough for the pods' host
    names (RUN: the run directory's name)."""
    if options.job_name is not None:
        return options.job_name
    run = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", run_name(config).lower())).strip("-")
    name = f"megabatch-{run}".strip("-")
    room = 63 - (len(longest_host_name("", options.flavour, options.nodes)))
    return name[:room].rstrip("-")


def run_name(config: RunConfig) -> str:
    """The run's name: its directory's (the ``run`` label of its metrics, as in
    RUN/prometheus-targets.json)."""
    return PurePosixPath(config.run_dir).name


def longest_host_name(name: str, flavour: str, nodes: int) -> str:
    """The last pod's host name: JobSet's NAME-node-0-INDEX, an Indexed Job's NAME-INDEX."""
    return f"{name}-{CONTAINER}-0-{nodes - 1}" if flavour == "kubeflow" else f"{name}-{nodes - 1}"


def node_selector(items: list[str], flag: str = "--node-selector") -> dict[str, str]:
    """KEY=VALUE items as a mapping; ConfigError for a key or value Kubernetes refuses."""
    selected = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        _check_qualified_name(flag, key)
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise ConfigError(f"{flag} {item!r}: {value!r} is not a label value (63 characters at most: letters, digits, -_.)")  # fmt: skip
        selected[key] = value
    return selected


def tolerations(items: list[str]) -> list[dict]:
    """KEY[=VALUE][:EFFECT] items as tolerations: KEY alone tolerates any value (Exists)."""
    result = []
    for item in items:
        taint, _, effect = item.partition(":")
        key, sep, value = taint.partition("=")
        if effect and effect not in _EFFECTS:
            raise ConfigError(f"--toleration {item!r}: the effect must be one of {', '.join(_EFFECTS)}")  # fmt: skip
        _check_qualified_name("--toleration", key)
        if sep and (len(value) > 63 or not _LABEL_VALUE.match(value)):
            raise ConfigError(f"--toleration {item!r}: {value!r} is not a taint value")
        toleration = {"key": key, "operator": "Equal" if sep else "Exists"}
        if sep:
            toleration["value"] = value
        if effect:
            toleration["effect"] = effect
        result.append(toleration)
    return result


def _check_name(flag: str, value: str, pattern: re.Pattern, limit: int, what: str) -> None:
    if len(value) > limit or not pattern.match(value):
        raise ConfigError(f"{flag} {value!r}: expected {what} ({limit} characters at most: lower-case letters, digits, -)")  # fmt: skip


def _check_qualified_name(flag: str, key: str) -> None:
    """A label key, taint key or resource name: [DNS-subdomain/]name."""
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix))) or len(name) > 63 or not _NAME_PART.match(name):  # fmt: skip
        raise ConfigError(f"{flag} {key!r}: expected a key such as example.com/name (letters, digits, -_.)")  # fmt: skip
