"""``megabatch submit SCHEDULER CONFIG [KEY=VALUE ...]``: a run handed to a scheduler.

The config is resolved and checked here, on the submitting machine, with the world size
the job will have, so that a mistake is said now, not after the job waited in the queue.
Slurm's nodes see the files this machine sees: every check the ranks make runs here (a
bad key, a batch that does not divide, missing shards, or a checkpoint in the run
directory that this config may not resume). Kubernetes pods see their volumes: the
config's values, batch arithmetic and model are checked here, its paths against the
volumes the pods mount, and the files themselves by the pods when they start
(docs/deploy.md). Then RUN/submit/ receives the resolved config (``config.yaml``, what
every requeue of the job runs) and the rendered job script (``megabatch.sbatch``) or
manifests (``k8s/``), and the scheduler gets them. ``--dry-run`` writes them and prints
the command instead of running it.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from megabatch.trainer.atomic_write import atomic_folder
from megabatch.trainer.commands import add_config_arguments, config_argument
from megabatch.trainer.config import ConfigError, RunConfig, config_text, dump_config, load_config
from megabatch.trainer.submission import SubmitError

SUBMIT_DIR = "submit"
"""Under the run directory: the resolved config, the job scripts, the job ids."""


def add_submit_command(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit",
        help="submit a training run to Slurm or Kubernetes (render the job, hand it over)",
        description="Resolve and check the config for the job's world size, write "
        "RUN/submit/config.yaml and the job script or manifests, and submit them. "
        "docs/deploy.md.",
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
    shape = _add_shape_arguments(slurm, "--tasks-per-node")
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
    _add_k8s_command(schedulers)


def _add_shape_arguments(parser: argparse.ArgumentParser, tasks_flag: str):
    """--nodes, --gpus-per-node and the ranks per node (``tasks_flag``): the world size."""
    shape = parser.add_argument_group("the job's shape")
    shape.add_argument("--nodes", type=int, default=1)
    shape.add_argument("--gpus-per-node", type=int, default=0,
                       help="GPUs per node (0: CPU ranks, gloo)")  # fmt: skip
    shape.add_argument(tasks_flag, dest="tasks_per_node", type=int, default=None,
                       metavar=tasks_flag.lstrip("-").replace("-", "_").upper(),
                       help="ranks per node (default: the GPUs per node, or 1 for CPU)")  # fmt: skip
    return shape


def _add_k8s_command(schedulers: argparse._SubParsersAction) -> None:
    from megabatch.trainer.k8s_options import FLAVOURS, GPU_RESOURCE, GRACE_MARGIN_S, PULL_POLICIES
    from megabatch.trainer.torchrun import DEFAULT_SHUTDOWN_TIMEOUT_S

    k8s = schedulers.add_parser(
        "k8s",
        help="render Kubernetes manifests (a Kubeflow TrainJob, or an Indexed Job) and kubectl apply them",
        description="Write RUN/submit/config.yaml and RUN/submit/k8s/: a ConfigMap with the "
        "resolved config, a Kubeflow Trainer TrainJob on the runtime in "
        "deploy/k8s/megabatch-runtime.yaml (--flavour kubeflow) or an Indexed Job and a "
        "headless Service (--flavour core), and a PodMonitor with metrics.prometheus=true. "
        "The config names the paths the pods see: run_dir under --runs-mount, the data "
        "under --data-mount (or the runs mount). A stop signal (a preemption's SIGTERM) "
        "makes the ranks save and exit 75, and the job starts again from that checkpoint "
        "without counting a failure. By default (--dry-run) prints the kubectl command; "
        "--apply runs it. Exit status: 0 written (or applied), 2 bad config or options, 1 "
        "kubectl missing, without a context, or refusing. docs/deploy.md.",
    )  # fmt: skip
    add_config_arguments(k8s)
    _add_shape_arguments(k8s, "--procs-per-node")
    pod = k8s.add_argument_group("the pods")
    pod.add_argument("--image", default="", help="container image with megabatch installed (required)")  # fmt: skip
    pod.add_argument("--image-pull-policy", default=None, choices=PULL_POLICIES,
                     help="core flavour only (default: Kubernetes')")  # fmt: skip
    pod.add_argument("--runs-claim", default="", metavar="CLAIM",
                     help="PersistentVolumeClaim holding the run directory (required)")  # fmt: skip
    pod.add_argument("--runs-mount", default="/runs", metavar="PATH",
                     help="where the pods mount it; run_dir must be below (default /runs)")  # fmt: skip
    pod.add_argument("--data-claim", default=None, metavar="CLAIM",
                     help="PersistentVolumeClaim holding the shards and tokenizer, mounted read-only")  # fmt: skip
    pod.add_argument("--data-mount", default="/data", metavar="PATH", help="where (default /data)")  # fmt: skip
    pod.add_argument("--cpu", default=None, metavar="QUANTITY", help="CPUs per pod (requests = limits), e.g. 32")  # fmt: skip
    pod.add_argument("--memory", default=None, metavar="QUANTITY", help="memory per pod (requests = limits), e.g. 256Gi")  # fmt: skip
    pod.add_argument("--gpu-resource", default=GPU_RESOURCE, metavar="NAME",
                     help="the GPUs' extended resource (default %(default)s)")  # fmt: skip
    pod.add_argument("--node-selector", dest="node_selector", action="append", default=[],
                     metavar="KEY=VALUE", help="node label the pods need (repeatable)")  # fmt: skip
    pod.add_argument("--toleration", dest="tolerations", action="append", default=[],
                     metavar="KEY[=VALUE][:EFFECT]", help="taint the pods tolerate; KEY alone: any value (repeatable)")  # fmt: skip
    job = k8s.add_argument_group("the job")
    job.add_argument("--flavour", choices=FLAVOURS, default="kubeflow",
                     help="kubeflow: a TrainJob (needs Kubeflow Trainer v2 and the runtime); "
                     "core: an Indexed Job and a headless Service (default kubeflow)")  # fmt: skip
    job.add_argument("--namespace", default=None, help="default: kubectl's current namespace")
    job.add_argument("--job-name", default=None, help="default: megabatch-RUN")
    job.add_argument("--runtime", default="megabatch",
                     help="the ClusterTrainingRuntime the TrainJob uses (default megabatch)")  # fmt: skip
    job.add_argument("--max-restarts", type=int, default=None,
                     help="restarts after a failure other than a save (exit 75); core "
                     "flavour: per node; kubeflow: the runtime's maxRestarts (3)")  # fmt: skip
    job.add_argument("--shutdown-timeout-s", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                     help="seconds torchrun gives the ranks to finish the step and save "
                     "after a signal (default %(default)s)")  # fmt: skip
    job.add_argument("--grace-period-s", type=int, default=None,
                     help="the pods' terminationGracePeriodSeconds (default: the shutdown "
                     f"timeout + {GRACE_MARGIN_S})")  # fmt: skip
    job.add_argument("--podmonitor-label", dest="podmonitor_labels", action="append", default=[],
                     metavar="KEY=VALUE", help="label the Prometheus's podMonitorSelector wants, e.g. release=prometheus (repeatable)")  # fmt: skip
    job.add_argument("--out", type=Path, default=None, metavar="DIR",
                     help="local folder for submit/ (default: runs/RUN in this folder, RUN "
                     "the run directory's name)")  # fmt: skip
    how = k8s.add_mutually_exclusive_group()
    how.add_argument("--dry-run", action="store_true",
                     help="write the files and print the kubectl command (the default)")  # fmt: skip
    how.add_argument("--apply", action="store_true",
                     help="and kubectl apply them (needs kubectl and a current context)")  # fmt: skip
    k8s.set_defaults(func=_cmd_submit_k8s)


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
        return _fail("slurm", str(exc), 2)
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
    except SubmitError as exc:
        return _fail("slurm", str(exc), 1)
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


def _cmd_submit_k8s(args: argparse.Namespace) -> int:
    from megabatch.trainer import k8s
    from megabatch.trainer.k8s_options import K8sOptions, check_config_for_pods, run_name
    from megabatch.trainer.preflight import check_config

    options = K8sOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        image=args.image, flavour=args.flavour, namespace=args.namespace, job_name=args.job_name,
        runtime=args.runtime, runs_claim=args.runs_claim, runs_mount=args.runs_mount,
        data_claim=args.data_claim, data_mount=args.data_mount, cpu=args.cpu, memory=args.memory,
        gpu_resource=args.gpu_resource, node_selector=args.node_selector,
        tolerations=args.tolerations, image_pull_policy=args.image_pull_policy,
        podmonitor_labels=args.podmonitor_labels, shutdown_timeout_s=args.shutdown_timeout_s,
        grace_period_s=args.grace_period_s, max_restarts=args.max_restarts,
    )  # fmt: skip
    try:  # everything is checked and rendered before anything is written
        options.check()
        config = load_config(*config_argument(args))
        # The pods' files are not this machine's: values here, files in the pods.
        check_config(config, options.world_size, tokenizer_optional=True)
        check_config_for_pods(config, options)
        name = k8s.job_name(options, config)
        text = config_text(config, extra={"submitted": _now(), "world_size": options.world_size,
                                          "kubernetes": f"{options.flavour} {name}"})  # fmt: skip
        manifests = k8s.build_manifests(options, config, text)
    except ConfigError as exc:
        return _fail("k8s", str(exc), 2)
    folder = (args.out or Path("runs") / run_name(config)) / SUBMIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / "config.yaml", text, mode=0o644)
    header = (f"Rendered by megabatch submit k8s --flavour {options.flavour} at {_now()}\n"
              f"(docs/deploy.md). The pods run {config.run_dir}.")  # fmt: skip
    k8s_dir = _replace_folder(folder / k8s.MANIFESTS_DIR,
                              {m.filename: k8s.manifest_text(m, header) for m in manifests})  # fmt: skip
    files = [k8s_dir / m.filename for m in manifests]
    job_files = [path for path in files if path.name != k8s.PODMONITOR_FILE]
    follow = "\n".join(f"  {what:<8} {line}" for what, line in k8s.follow_commands(options, config).items())  # fmt: skip
    needs = k8s.prerequisites(options, config)
    if not args.apply:
        print(f"wrote {folder / 'config.yaml'} and {k8s_dir}/ ({', '.join(m.filename for m in manifests)}); "
              f"apply with:\n  {' '.join(k8s.apply_command(files))}\n{needs}then follow it:\n{follow}")  # fmt: skip
        return 0
    try:
        k8s.check_kubectl(k8s_dir)
        said = k8s.kubectl_apply(job_files)
    except SubmitError as exc:
        return _fail("k8s", str(exc), 1)
    with (folder / "jobs.txt").open("a") as jobs:
        jobs.write(f"{name} k8s-{options.flavour} {_now()}\n")
    print(said.rstrip())
    monitor = [path for path in files if path.name == k8s.PODMONITOR_FILE]
    if monitor:
        try:
            print(k8s.kubectl_apply(monitor).rstrip())
        except SubmitError as exc:  # the job runs all the same; its metrics wait for this
            print(f"megabatch submit k8s: warning: {exc} (is the Prometheus Operator "
                  f"installed?); the job was applied", file=sys.stderr)  # fmt: skip
    print(f"submitted {options.flavour} job {name}: {options.nodes} node(s) x "
          f"{options.ranks_per_node} rank(s)\n"
          f"  run directory  {config.run_dir} on claim {options.runs_claim}\n"
          f"  manifests      {k8s_dir}\n{follow}")  # fmt: skip
    return 0


def _replace_folder(folder: Path, files: dict[str, str]) -> Path:
    """``folder`` holding exactly ``files`` (name: text): written beside it, then swapped
    in, so that it is never half-written and keeps no file of an earlier submission."""
    with atomic_folder(folder, overwrite=True) as partial:
        for name, text in files.items():
            (partial / name).write_text(text)
    return folder


def _checked_config(path: str | None, overrides: list[str], world_size: int) -> RunConfig:
    """The resolved config, checked for ``world_size`` ranks, with an absolute run_dir
    (the job may start anywhere)."""
    from megabatch.trainer.preflight import check_run

    config = load_config(path, overrides)
    config.run_dir = os.path.abspath(config.run_dir)
    check_run(config, world_size)
    return config


def _write_atomically(path: Path, text: str, mode: int = 0o755) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fail(scheduler: str, message: str, status: int) -> int:
    print(f"megabatch submit {scheduler}: error: {message}", file=sys.stderr)
    return status
