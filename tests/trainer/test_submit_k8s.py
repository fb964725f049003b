"""``megabatch submit k8s`` without a cluster: what can be checked here is.

- Every core object (ConfigMap, Service, Job; the runtime's Job template) validates with
  kubernetes-validate, strict, against ``k8s.KUBERNETES_VERSION``.
- The TrainJob and the ClusterTrainingRuntime go through kubeflow-trainer-api's models
  (Kubeflow Trainer 2.3's API) and come back with every field they were given: a field
  the API does not have is dropped by the models, and fails here.
- The PodMonitor validates against the Prometheus Operator's CRD schema (schemas/, v0.93.0),
  made strict the way ``kubectl apply --validate=strict`` is (unknown fields refused).
- The failure rules (exit 75 restarts uncounted in both flavours), the grace period, the
  resources, the rendezvous variables, bad input (one line, exit 2, nothing written) and
  ``--apply`` without kubectl, without a context and with a stand-in kubectl.
- The container's command, run here with the environment Kubeflow injects for 1 node x 2
  processes, trains a short run.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api.models import (
    TrainerV1alpha1ClusterTrainingRuntime,
    TrainerV1alpha1TrainJob,
)

from megabatch.trainer import k8s, k8s_runtime
from megabatch.trainer.cli import main
from megabatch.trainer.config import MetricsConfig
from megabatch.trainer.k8s_options import K8sOptions
from megabatch.trainer.torchrun import DEFAULT_SHUTDOWN_TIMEOUT_S
from tests.trainer.runs import ROOT, env, overrides

PODMONITOR_SCHEMA = Path(__file__).parent / "schemas" / "podmonitor-v0.93.0.schema.yaml"
IMAGE = "registry.example.com/megabatch:0.1.0"
MODELS = {"TrainJob": TrainerV1alpha1TrainJob,
          "ClusterTrainingRuntime": TrainerV1alpha1ClusterTrainingRuntime}  # fmt: skip
# What Kubeflow Trainer 2.3's torch plugin (pkg/runtime/framework/plugins/torch/torch.go)
# sets in the `node` container, and the TrainJob must therefore not set itself.
KUBEFLOW_INJECTED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                     "PET_MASTER_PORT")  # fmt: skip


def _submit(capsys, data: Path, tmp_path: Path, *options: str, run: str = "clip",
            **extra) -> tuple[int, str, str]:  # fmt: skip
    """``megabatch submit k8s`` on the tiny shard set, with the data folder and
    tmp_path/runs standing in for the pods' mounts: the config's paths are real here too
    (the command's run below needs them) and lie under the mounts, as the pods see them."""
    runs = tmp_path / "runs"
    more = [o for o in options if not o.startswith("--")]  # KEY=VALUE: before the options
    argv = ["submit", "k8s", *overrides(data, runs / run, **extra), *more, f"--image={IMAGE}",
            "--runs-claim=megabatch-runs", f"--runs-mount={runs}", "--data-claim=shards",
            f"--data-mount={data}", f"--out={tmp_path / 'local'}",
            *(o for o in options if o.startswith("--"))]  # fmt: skip
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _manifests(tmp_path: Path) -> dict[str, dict]:
    folder = tmp_path / "local" / "submit" / "k8s"
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(folder.iterdir())}


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _lost(given, back, where="$") -> list[str]:
    """Where ``back`` (a model's round trip) lacks or changed what ``given`` holds. The
    models add their defaults (protocol: TCP); they drop what they do not know."""
    if isinstance(given, dict):
        if not isinstance(back, dict):
            return [where]
        return [p for key, value in given.items()
                for p in ([f"{where}.{key}"] if key not in back else _lost(value, back[key], f"{where}.{key}"))]  # fmt: skip
    if isinstance(given, list):
        if not isinstance(back, list) or len(back) != len(given):
            return [where]
        return [p for i, (a, b) in enumerate(zip(given, back, strict=True)) for p in _lost(a, b, f"{where}[{i}]")]  # fmt: skip
    return [] if given == back else [f"{where}: {given!r} became {back!r}"]


def _kubeflow_lost(obj: dict) -> list[str]:
    return _lost(obj, MODELS[obj["kind"]].from_dict(obj).to_dict())


def _strict(schema):
    """A CRD schema as the API server applies it with strict field validation: an object
    with properties takes no other key (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
        schema["additionalProperties"] = False
    return schema


def _podmonitor_errors(obj: dict) -> list[str]:
    schema = _strict(yaml.safe_load(PODMONITOR_SCHEMA.read_text()))
    return [f"{list(e.absolute_path)}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]  # fmt: skip


# --------------------------------------------------------------------------- the objects
def test_the_kubeflow_flavour_writes_a_trainjob_a_configmap_and_a_podmonitor(data, tmp_path, capsys):  # fmt: skip
    status, out, err = _submit(
        capsys, data, tmp_path, "--nodes=2", "--gpus-per-node=8", "--cpu=96", "--memory=1Ti",
        "--node-selector=nvidia.com/gpu.product=H100", "--toleration=nvidia.com/gpu:NoSchedule",
        "--toleration=pool=train:NoExecute", "--namespace=vision", "--podmonitor-label=release=prom",
        "batch.micro_batch_size=4", "batch.accumulation_steps=1", "metrics.prometheus=true",
        "metrics.address=0.0.0.0",
    )  # fmt: skip
    assert status == 0, err
    folder = tmp_path / "local" / "submit"
    objects = _manifests(tmp_path)
    assert set(objects) == {"configmap.yaml", "trainjob.yaml", "podmonitor.yaml"}
    files = " ".join(f"-f {folder / 'k8s' / name}" for name in ("configmap.yaml", "trainjob.yaml", "podmonitor.yaml"))  # fmt: skip
    assert f"kubectl apply {files}" in out
    assert f"kubectl apply -f {k8s_runtime.runtime_path()}" in out  # once per cluster

    # The ConfigMap holds the resolved config, as RUN/submit/config.yaml does.
    config_text = (folder / "config.yaml").read_text()
    assert objects["configmap.yaml"]["data"]["config.yaml"] == config_text
    config = yaml.safe_load(config_text)
    assert config["run_dir"] == str(tmp_path / "runs" / "clip")
    assert "# world_size: 16" in config_text

    job = objects["trainjob.yaml"]
    assert job["metadata"] == {"name": "megabatch-clip", "namespace": "vision", "labels": {
        "app.kubernetes.io/name": "megabatch", "app.kubernetes.io/instance": "megabatch-clip"}}  # fmt: skip
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime", "name": "megabatch"}  # fmt: skip
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == IMAGE and trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["command"] == ["megabatch", "launch", "--shutdown-timeout=300", "train", "/etc/megabatch/config.yaml"]  # fmt: skip
    wanted = {"cpu": "96", "memory": "1Ti", "nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"] == {"limits": wanted, "requests": wanted}
    assert not set(_env(trainer)) & set(KUBEFLOW_INJECTED)  # Kubeflow refuses them
    assert "DS_ACCELERATOR" not in _env(trainer)  # GPU ranks

    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 360 > DEFAULT_SHUTDOWN_TIMEOUT_S
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "train", "effect": "NoExecute"}]  # fmt: skip
    assert {v["name"]: v for v in pod["volumes"]} == {
        "config": {"name": "config", "configMap": {"name": "megabatch-clip-config"}},
        "runs": {"name": "runs", "persistentVolumeClaim": {"claimName": "megabatch-runs"}},
        "data": {"name": "data", "persistentVolumeClaim": {"claimName": "shards", "readOnly": True}}}  # fmt: skip
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]} == {
        "/etc/megabatch": True, str(tmp_path / "runs"): False, str(data): True}  # fmt: skip

    monitor = objects["podmonitor.yaml"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    # JobSet labels every pod of the TrainJob's JobSet (named as the TrainJob) so.
    assert monitor["spec"]["selector"] == {"matchLabels": {"jobset.sigs.k8s.io/jobset-name": "megabatch-clip"}}  # fmt: skip
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"  # job="megabatch"
    # One endpoint per local rank, on the ports the runtime declares for them.
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics"] + [f"metrics-{k}" for k in range(1, 8)]
    assert set(ports) <= {p["name"] for p in k8s_runtime.runtime_container()["ports"]}


def test_the_core_flavour_writes_an_indexed_job_and_a_headless_service(data, tmp_path, capsys):
    status, out, err = _submit(capsys, data, tmp_path, "--flavour=core", "--nodes=3",
                               "--procs-per-node=2", "--image-pull-policy=Always",
                               "--max-restarts=5", "--shutdown-timeout-s=600",
                               "metrics.prometheus=true", "metrics.address=0.0.0.0",
                               "metrics.port=9500")  # fmt: skip
    assert status == 0, err
    objects = _manifests(tmp_path)
    assert set(objects) == {"configmap.yaml", "service.yaml", "job.yaml", "podmonitor.yaml"}
    service, job = objects["service.yaml"], objects["job.yaml"]
    name = job["metadata"]["name"]
    assert name == service["metadata"]["name"] == "megabatch-clip"
    assert "namespace" not in job["metadata"]  # kubectl's current one
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (5, 0)
    pod = _pod(job)
    assert pod["restartPolicy"] == "Never"  # a pod failure policy needs it
    assert pod["terminationGracePeriodSeconds"] == 660  # 600 + 60: after torchrun's SIGKILL
    (container,) = pod["containers"]
    assert container["command"][:3] == ["megabatch", "launch", "--shutdown-timeout=600"]
    assert container["imagePullPolicy"] == "Always"
    assert "resources" not in container  # no GPU, no --cpu, no --memory

    # Node 0 is NAME-0.SERVICE: an Indexed Job's pod host name, the Service as subdomain,
    # and the Service selects the label the Job controller gives the job's pods.
    variables = _env(container)
    assert pod["subdomain"] == service["metadata"]["name"]
    assert variables["PET_MASTER_ADDR"] == f"{name}-0.{service['metadata']['name']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert variables["PET_MASTER_PORT"] == str(service["spec"]["ports"][0]["port"]) == "29500"
    assert variables["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}  # fmt: skip
    assert (variables["PET_NNODES"], variables["PET_NPROC_PER_NODE"]) == ("3", "2")
    assert variables["DS_ACCELERATOR"] == "cpu"  # CPU ranks: gloo, no CUDA
    assert set(KUBEFLOW_INJECTED) <= set(variables)  # what Kubeflow would inject, set here

    # The core pod is the runtime's: its /dev/shm, with this job's ports and volumes.
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9500},
                                  {"name": "metrics-1", "containerPort": 9501}]  # fmt: skip
    monitor = objects["podmonitor.yaml"]
    assert monitor["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/job-name": name}}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "metrics-1"]


def test_every_core_object_validates_strictly_against_kubernetes(data, tmp_path, capsys):
    status, _, err = _submit(capsys, data, tmp_path, "--flavour=core", "--nodes=2",
                             "--gpus-per-node=4", "--cpu=500m", "--memory=64Gi",
                             "--node-selector=pool=gpu", "--toleration=gpu=yes",
                             "--namespace=team-a")  # fmt: skip
    assert status == 0, err
    objects = _manifests(tmp_path)
    assert {o["kind"] for o in objects.values()} == {"ConfigMap", "Service", "Job"}
    limits = _pod(objects["job.yaml"])["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "500m", "memory": "64Gi", "nvidia.com/gpu": "4"}
    for obj in objects.values():
        kubernetes_validate.validate(obj, k8s.KUBERNETES_VERSION, strict=True)
    # The runtime's Job template, as the Job each TrainJob's JobSet makes of it.
    node = k8s_runtime.runtime_node_job()
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
                                  "spec": node["spec"]}, k8s.KUBERNETES_VERSION, strict=True)  # fmt: skip
    # And the strict schema does refuse a misspelt field.
    broken = objects["job.yaml"]
    _pod(broken)["terminationGracePeriod"] = 360
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, k8s.KUBERNETES_VERSION, strict=True)


def test_the_kubeflow_objects_keep_every_field_through_kubeflows_api_models(data, tmp_path, capsys):  # fmt: skip
    status, _, err = _submit(capsys, data, tmp_path, "--nodes=4", "--gpus-per-node=8",
                             "--memory=512Gi", "--toleration=nvidia.com/gpu:NoSchedule",
                             "--node-selector=pool=a100")  # fmt: skip
    assert status == 0, err
    trainjob = _manifests(tmp_path)["trainjob.yaml"]
    assert _kubeflow_lost(trainjob) == []
    assert _kubeflow_lost(k8s_runtime.runtime()) == []
    # The check has teeth: a misspelt field is dropped by the models, and said here.
    trainjob["spec"]["trainer"]["numNode"] = 4
    assert _kubeflow_lost(trainjob) == ["$.spec.trainer.numNode"]


def test_the_podmonitor_validates_against_the_operators_schema(data, tmp_path, capsys):
    status, _, err = _submit(capsys, data, tmp_path, "--procs-per-node=3", "metrics.prometheus=true",
                             "metrics.address=0.0.0.0")  # fmt: skip
    assert status == 0, err
    monitor = _manifests(tmp_path)["podmonitor.yaml"]
    assert _podmonitor_errors(monitor) == []
    (first, *_) = monitor["spec"]["podMetricsEndpoints"]
    assert first["relabelings"][0] == {"action": "replace", "targetLabel": "run", "replacement": "clip"}  # fmt: skip
    monitor["spec"]["podMetricsEndpoints"][0]["portName"] = "metrics"  # not a field
    assert _podmonitor_errors(monitor) != []


def test_without_metrics_there_is_no_podmonitor(data, tmp_path, capsys):
    status, out, err = _submit(capsys, data, tmp_path)
    assert status == 0, err
    assert set(_manifests(tmp_path)) == {"configmap.yaml", "trainjob.yaml"}
    assert "PodMonitor" not in out


# --------------------------------------------------------------------------- the failure policy
def test_a_save_after_a_stop_signal_restarts_the_job_uncounted_in_both_flavours(data, tmp_path, capsys):  # fmt: skip
    # Kubeflow: exit 75 (or a disruption) fails the node Job by its pod failure policy,
    # and the JobSet restarts every Job for that reason without counting it.
    runtime = k8s_runtime.runtime()
    node = k8s_runtime.runtime_node_job(runtime)["spec"]
    rules = node["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "node", "operator": "In", "values": [75]}}  # fmt: skip
    assert rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert node["backoffLimit"] == 0 and node["template"]["spec"]["restartPolicy"] == "Never"
    policy = runtime["spec"]["template"]["spec"]["failurePolicy"]
    assert policy["rules"][0]["action"] == "RestartJobSetAndIgnoreMaxRestarts"
    assert policy["rules"][0]["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert all(r["action"] == "FailJob" for r in rules)  # every rule's failure is a requeue

    # Core: a pod that exited 75 is replaced, not counted; a bad config is not retried.
    status, _, err = _submit(capsys, data, tmp_path, "--flavour=core", "--nodes=2")
    assert status == 0, err
    spec = _manifests(tmp_path)["job.yaml"]["spec"]
    ignore, disruption, bad_config = spec["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onExitCodes": {"containerName": "node", "operator": "In", "values": [75]}}  # fmt: skip
    assert disruption == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}  # fmt: skip
    assert bad_config["action"] == "FailJob" and bad_config["onExitCodes"]["values"] == [2]
    assert spec["podReplacementPolicy"] == "Failed"  # a new pod once the old one is gone
    assert spec["backoffLimitPerIndex"] == policy["maxRestarts"]  # the same default


def test_the_runtime_is_a_kubeflow_torch_runtime_running_the_submitted_command():
    runtime = k8s_runtime.runtime()
    assert runtime["kind"] == "ClusterTrainingRuntime" and "torch" in runtime["spec"]["mlPolicy"]
    node = k8s_runtime.runtime_node_job(runtime)
    # How Kubeflow's torch plugin finds the trainer's Job and container for PET_*.
    assert node["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    container = k8s_runtime.runtime_container(runtime)
    assert container["command"] == k8s.container_command(K8sOptions())
    assert node["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > DEFAULT_SHUTDOWN_TIMEOUT_S  # fmt: skip
    ports = k8s_runtime.runtime_metrics_ports()
    assert ports == [(k8s_runtime.metrics_port_name(k), MetricsConfig().port + k) for k in range(8)]  # fmt: skip


def test_the_grace_period_is_derived_from_the_shutdown_timeout(data, tmp_path, capsys):
    status, _, err = _submit(capsys, data, tmp_path, "--shutdown-timeout-s=900", "--grace-period-s=1000")  # fmt: skip
    assert status == 0, err
    trainjob = _manifests(tmp_path)["trainjob.yaml"]
    assert "--shutdown-timeout=900" in trainjob["spec"]["trainer"]["command"]
    (patch,) = trainjob["spec"]["runtimePatches"]
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]  # fmt: skip
    assert pod["terminationGracePeriodSeconds"] == 1000


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options,extra,message",
    [
        (["--nodes=0"], {}, "--nodes must be >= 1, got 0"),
        (["--procs-per-node=0"], {}, "--procs-per-node must be >= 1, got 0"),
        (["--image="], {}, "--image is required"),
        (["--runs-claim="], {}, "--runs-claim is required"),
        (["--runs-claim=Runs_1"], {}, "--runs-claim 'Runs_1': expected a PersistentVolumeClaim name"),
        (["--job-name=9lives"], {}, "--job-name '9lives': expected a DNS label"),
        (["--job-name=" + "a" * 56, "--nodes=2"], {}, "the pod host name " + "a" * 56 + "-node-0-1 is over 63"),
        (["--namespace=Team"], {}, "--namespace 'Team': expected a DNS label"),
        (["--runs-mount=runs"], {}, "--runs-mount 'runs': expected an absolute, normalised folder"),
        (["--runs-mount=/etc"], {}, "overlap"),
        (["--cpu=lots"], {}, "--cpu 'lots': expected a Kubernetes quantity"),
        (["--node-selector=pool"], {}, "--node-selector 'pool': expected KEY=VALUE"),
        (["--toleration=gpu:Sometimes"], {}, "--toleration 'gpu:Sometimes': the effect must be one of"),
        (["--grace-period-s=305"], {}, "--grace-period-s 305 must exceed --shutdown-timeout-s 300 by 10 s"),
        (["--max-restarts=7"], {}, "--max-restarts 7: the kubeflow flavour takes it from the runtime"),
        (["--image-pull-policy=Always"], {}, "--image-pull-policy: a TrainJob cannot set it"),
        # The config: for the job's world size (4 ranks), as the ranks would check it.
        (["--nodes=2", "--procs-per-node=2"], {"batch.global_batch_size": 32},
         "batch.global_batch_size is 32 but micro_batch_size x accumulation_steps x world size = 8 x 2 x 4 = 64"),
        ([], {"optim.lrr": 1}, "unknown key optim.lrr"),
        ([], {"model.preset": "huge"}, "huge"),
        # The config against the pods' volumes.
        (["run_dir=/home/me/runs/clip"], {}, "run_dir /home/me/runs/clip: the pods write the run on the runs claim"),
        ([], {"data.val": "/home/me/val"}, "data.val /home/me/val: the pods see only the volumes"),
        ([], {"data.tokenizer": "tok.json"}, "data.tokenizer tok.json: the pods see only"),
        ([], {"metrics.prometheus": True}, "metrics.address 127.0.0.1: Prometheus scrapes the pod's address"),
        ([], {"metrics.prometheus": True, "metrics.address": "0.0.0.0", "metrics.port": 9000},
         "metrics.port 9000 with 1 rank(s) per node: the runtime declares ports 9431-9438"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_writes_nothing(data, tmp_path, capsys, options, extra,
                                                         message):  # fmt: skip
    status, out, err = _submit(capsys, data, tmp_path, *options, **extra)
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("megabatch submit k8s: error: ") and message in err, err
    assert not (tmp_path / "local").exists() and not (tmp_path / "runs").exists()


def test_a_new_submission_replaces_the_manifests_of_the_last(data, tmp_path, capsys):
    assert _submit(capsys, data, tmp_path)[0] == 0
    assert _submit(capsys, data, tmp_path, "--flavour=core")[0] == 0
    # kubectl apply -f on the folder applies the core job alone, not the old TrainJob too.
    assert set(_manifests(tmp_path)) == {"configmap.yaml", "service.yaml", "job.yaml"}
    assert sorted(p.name for p in (tmp_path / "local" / "submit").iterdir()) == [
        "config.yaml",
        "k8s",
    ]


# --------------------------------------------------------------------------- --apply
def test_apply_without_kubectl_keeps_the_manifests_and_says_so(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no kubectl (nor anything else)
    status, out, err = _submit(capsys, data, tmp_path, "--apply")
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("megabatch submit k8s: error: kubectl not found on PATH; the manifests "
                          f"are in {tmp_path / 'local' / 'submit' / 'k8s'}")  # fmt: skip
    assert (tmp_path / "local" / "submit" / "k8s" / "trainjob.yaml").is_file()
    assert not (tmp_path / "local" / "submit" / "jobs.txt").exists()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_apply_without_a_kubectl_context_says_so(data, tmp_path, capsys, monkeypatch):
    config = tmp_path / "kubeconfig"
    config.write_text("")  # a kubectl that knows no cluster
    monkeypatch.setenv("KUBECONFIG", str(config))
    status, out, err = _submit(capsys, data, tmp_path, "--apply")
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert "kubectl has no cluster to apply to" in err, err
    assert err.strip().endswith("kubectl config current-context: error: current-context is not set"), err  # fmt: skip


def _fake_kubectl(tmp_path: Path, monkeypatch, refuse: str = "") -> Path:
    """A kubectl that has a context, logs its arguments, and refuses files named ``refuse``."""
    bin_dir, log = tmp_path / "bin", tmp_path / "kubectl.log"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                    f'case "$*" in *"{refuse or "NOTHING"}"*) echo "error: resource mapping not '
                    'found for kind PodMonitor" >&2; exit 1;; esac\n'
                    'echo "configured $*"\n')  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_apply_applies_the_job_then_the_podmonitor(data, tmp_path, capsys, monkeypatch):
    log = _fake_kubectl(tmp_path, monkeypatch, refuse="podmonitor.yaml")
    status, out, err = _submit(capsys, data, tmp_path, "--apply", "--flavour=core",
                               "metrics.prometheus=true", "metrics.address=0.0.0.0")  # fmt: skip
    assert status == 0, err
    folder = tmp_path / "local" / "submit" / "k8s"
    calls = log.read_text().splitlines()
    assert calls[0] == "config current-context"
    assert calls[1] == f"apply -f {folder}/configmap.yaml -f {folder}/service.yaml -f {folder}/job.yaml"  # fmt: skip
    assert calls[2] == f"apply -f {folder}/podmonitor.yaml"
    # No Prometheus Operator: the job runs all the same, and the warning says why.
    assert "warning: kubectl apply refused podmonitor.yaml: error: resource mapping not found" in err  # fmt: skip
    assert "submitted core job megabatch-clip: 1 node(s) x 1 rank(s)" in out
    (line,) = (tmp_path / "local" / "submit" / "jobs.txt").read_text().splitlines()
    assert line.startswith("megabatch-clip k8s-core ")


def test_a_refused_apply_is_one_line_exit_1(data, tmp_path, capsys, monkeypatch):
    _fake_kubectl(tmp_path, monkeypatch, refuse="trainjob.yaml")
    status, out, err = _submit(capsys, data, tmp_path, "--apply")
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert err.strip() == ("megabatch submit k8s: error: kubectl apply refused configmap.yaml, "
                           "trainjob.yaml: error: resource mapping not found for kind PodMonitor")  # fmt: skip
    assert not (tmp_path / "local" / "submit" / "jobs.txt").exists()


# --------------------------------------------------------------------------- the help
def test_every_option_of_the_help_is_in_docs_deploy(capsys):
    with pytest.raises(SystemExit):
        main(["submit", "k8s", "--help"])
    flags = {
        word.strip(",[]().;:").split("=")[0]
        for word in capsys.readouterr().out.split()
        if word.startswith("--")
    }
    docs = (ROOT / "docs" / "deploy.md").read_text().split("## Kubernetes", 1)[1]
    assert sorted(f for f in flags if f"`{f}" not in docs) == ["--help"]


# --------------------------------------------------------------------------- the command
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kubeflow_env(trainjob: dict, node_rank: int) -> dict[str, str]:
    """PET_* as Kubeflow Trainer 2.3's torch plugin sets them from a TrainJob (its
    EnforceMLPolicy), on node ``node_rank``."""
    name, trainer = trainjob["metadata"]["name"], trainjob["spec"]["trainer"]
    return {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(node_rank), "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",
            "PET_MASTER_PORT": "29500"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.multiproc
def test_the_containers_command_trains_with_the_environment_kubeflow_injects(data, tmp_path, capsys):  # fmt: skip
    status, _, err = _submit(capsys, data, tmp_path, "--procs-per-node=2", "--flavour=core",
                             **{"train.max_steps": 4, "train.checkpoint_every_steps": 2})  # fmt: skip
    assert status == 0, err
    (container,) = _pod(_manifests(tmp_path)["job.yaml"])["containers"]
    assert _submit(capsys, data, tmp_path, "--procs-per-node=2", run="clip",
                   **{"train.max_steps": 4, "train.checkpoint_every_steps": 2})[0] == 0  # fmt: skip
    trainjob = _manifests(tmp_path)["trainjob.yaml"]
    # Both flavours run one command, and the core Job sets what Kubeflow would inject.
    assert container["command"] == trainjob["spec"]["trainer"]["command"]
    kubeflow = _kubeflow_env(trainjob, node_rank=0)
    core = _env(container)
    assert {k: core[k] for k in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_MASTER_PORT")} == {
        k: kubeflow[k] for k in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_MASTER_PORT")}  # fmt: skip

    # On this machine: the config path is the local copy of the ConfigMap's, node 0's host
    # is this one, the port a free one (the data and runs "mounts" are real folders here).
    config = tmp_path / "local" / "submit" / "config.yaml"
    command = [str(config) if word == k8s_runtime.CONFIG_PATH else word for word in container["command"]]  # fmt: skip
    assert command[0] == "megabatch"
    variables = {**{k: v for k, v in core.items() if isinstance(v, str)},
                 **kubeflow, "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port())}  # fmt: skip
    bin_dir = str(Path(sys.executable).parent)  # the megabatch console script
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=100,
                          env=env(**variables, PATH=f"{bin_dir}:{os.environ['PATH']}"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "clip"
    assert json.loads((run / "results.json").read_text())
    assert (run / "checkpoints" / "step00000004").is_dir()
    assert yaml.safe_load((run / "config.yaml").read_text())["run_dir"] == str(run)
