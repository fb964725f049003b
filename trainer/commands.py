"""``megabatch train``, ``megabatch eval`` and ``megabatch demo``."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from megabatch.trainer.config import ConfigError, load_config
from megabatch.trainer.preflight import CheckedRun, check_run
from megabatch.trainer.stop_signals import StopSignals

DEMO_DATA = Path("data/digits")


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a method: CLIP, SimCLR, MoCo v3, BYOL, a pretext task (several ranks: "
        "megabatch launch, or srun)",
        description="Train from a YAML config with key=value overrides, e.g. "
        "`megabatch train run.yaml optim.lr=3e-4`. Writes RUN/config.yaml, configs/ (every "
        "start's config), metrics.jsonl, checkpoints/, results.json and plots/. Resumes "
        "from the newest complete checkpoint (train.resume=auto); a change to what a step "
        "means (model, batch arithmetic, task, data order) is refused. Exit status: 0 done, "
        "2 bad config or input, 1 failed, 75 saved after SIGTERM/SIGUSR1/SIGUSR2 (requeue the job "
        "unchanged and it resumes).",
    )
    add_config_arguments(train)
    train.set_defaults(func=_cmd_train)

    ev = commands.add_parser(
        "eval",
        help="evaluate a run's newest checkpoint (zero-shot, retrieval, probe, kNN)",
        description="Rebuild the run from RUN/config.yaml, load its newest complete "
        "checkpoint and evaluate it on data.val; writes RUN/results.json.",
    )
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ev.set_defaults(func=_cmd_eval)

    demo = commands.add_parser(
        "demo",
        help="build the digits demo, train the tiny CLIP on 2 CPU ranks, evaluate, export",
        description="Writes the demo shards and tokenizer under data/digits if missing, "
        "trains preset demo-clip on 2 ranks (megabatch launch), prints the evaluation, and "
        "exports the trained model (megabatch export: transformers and ONNX) to "
        "RUN/export/stepNNNNNNNN, replacing an earlier export of that step.",
    )
    demo.add_argument("--ranks", type=int, default=2)
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    demo.set_defaults(func=_cmd_demo)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [KEY=VALUE ...]``, as train and submit take them (see ``config_argument``)."""
    parser.add_argument("config", nargs="?", help="YAML config (optional with preset=...)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def config_argument(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(config path or None, overrides): with no config file, argparse puts the first
    override where the path goes."""
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _fail(command: str, message: str) -> int:
    print(f"megabatch {command}: error: {message}", file=sys.stderr)
    return 2


def _world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _cmd_train(args: argparse.Namespace) -> int:
    config_path, overrides = config_argument(args)
    with StopSignals() as signals:  # from now on a stop signal is not lost
        try:
            config = load_config(config_path, overrides)
            checked = check_run(config, _world_size_from_env())  # before any process group
            server = None
            if config.metrics.prometheus:  # bound now: a port in use is said before training
                from megabatch.trainer.prometheus import MetricsServer, local_rank_from_env

                server = MetricsServer.start(config.metrics, local_rank_from_env())
        except ConfigError as exc:
            return _fail("train", str(exc))
        return _run("train", config, checked, signals, server)


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        # The run is where it is now: its config.yaml may name where it was trained.
        config = load_config(args.run_dir / "config.yaml",
                             [f"run_dir={args.run_dir}", "train.resume=auto", *args.overrides])  # fmt: skip
        checked = check_run(config, _world_size_from_env(), for_eval=True)
        if checked.resume.checkpoint is None:
            raise ConfigError(f"no complete checkpoint to evaluate in {args.run_dir}/checkpoints")
    except ConfigError as exc:
        return _fail("eval", str(exc))
    return _run("eval", config, checked)


def _run(command: str, config, checked: CheckedRun, signals: StopSignals | None = None,
         metrics_server=None) -> int:  # fmt: skip
    """Build the world and the trainer, run the command; errors are one line per rank
    (the rank named when there are several) and an exit status: 2 for bad input (data,
    a refused checkpoint), 1 for a failed run, 75 to requeue."""
    from megabatch.data_pipeline.errors import DataError
    from megabatch.trainer.checkpoint import CheckpointError, CheckpointWriteError
    from megabatch.trainer.launch import init_world
    from megabatch.trainer.peers import PeerLostError, is_collective_failure
    from megabatch.trainer.train import NonFiniteLossError, Trainer

    if signals is not None and signals.received:  # before anything started: nothing to save
        print(f"megabatch {command}: {signals.received} while starting; exiting for requeue",
              file=sys.stderr)  # fmt: skip
        return 75
    try:
        world = init_world(config.train.collective_timeout_s)
    except ConfigError as exc:  # the network set-up (launch.check_gloo_address)
        return _fail(command, str(exc))
    who = f"megabatch {command}: " + (f"rank {world.rank}: " if world.world_size > 1 else "")
    status, reason, trainer = 1, "", None
    try:
        trainer = Trainer(config, world, checked.resume, signals, checked.tokenizer,
                          metrics_server)  # fmt: skip
        if command == "eval":
            results = trainer.evaluate_checkpoint()
            if world.is_main:
                print(json.dumps(results, indent=2))
            status = 0
        else:
            status = trainer.train()["exit_code"]
    except NonFiniteLossError as exc:  # the same on every rank: said once
        status, reason = 1, str(exc)
        if world.is_main:
            print(f"megabatch {command}: error: {exc}", file=sys.stderr)
    except (DataError, CheckpointError) as exc:
        status, reason = (1 if isinstance(exc, CheckpointWriteError) else 2), str(exc)
        print(f"{who}error: {exc}", file=sys.stderr)
    except PeerLostError as exc:
        status, reason = (75 if exc.verdict.requeue else 1), str(exc)
        print(f"{who}error: {exc}", file=sys.stderr)
    except RuntimeError as exc:
        if world.peers is None or not is_collective_failure(exc):
            raise
        # gloo's "[.../pair.cc:553] Connection closed by peer [addr]. This is ...": the gist.
        gist = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0]).split(". ")[0]
        verdict = world.peers.describe_failure(f"a collective failed ({gist[:160]})")
        status, reason = (75 if verdict.requeue else 1), verdict.message
        print(f"{who}error: {verdict.message}", file=sys.stderr)
    finally:
        if trainer is not None:
            trainer.close(status)
        if world.peers is not None:
            world.peers.exited(status, reason)
    return status


def _cmd_demo(args: argparse.Namespace) -> int:
    from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer, captions_from_shards
    from megabatch.data_pipeline.write.demo import write_demo

    if not (DEMO_DATA / "train" / "manifest.json").is_file():
        print(f"writing the digits demo shards to {DEMO_DATA}", file=sys.stderr)
        write_demo(DEMO_DATA)
    tokenizer = DEMO_DATA / "tokenizer.json"
    if not tokenizer.is_file():
        captions = list(captions_from_shards(str(DEMO_DATA / "train")))
        CaptionTokenizer.train(captions, vocab_size=1000).save(tokenizer)
    config = load_config(None, ["preset=demo-clip", *args.overrides])
    command = [sys.executable, "-m", "megabatch.trainer.cli", "launch", f"--nproc-per-node={args.ranks}",
               "train", "preset=demo-clip", *args.overrides]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    code = subprocess.run(command, env=env, check=False).returncode
    results = Path(config.run_dir) / "results.json"
    if code != 0 or not results.is_file():
        return code or 1
    values = json.loads(results.read_text())
    print("\n| metric | value |\n|---|---:|")
    for key, value in values.items():
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    print(
        f"\nplots: {Path(config.run_dir) / 'plots'}/*.png, metrics: {config.run_dir}/metrics.jsonl"
    )
    return _export_demo(Path(config.run_dir))


def _export_demo(run_dir: Path) -> int:
    """The demo's last step: the trained model as a downstream team gets it."""
    from megabatch.trainer.export import ExportError, export, plan_export

    try:
        out = export(plan_export(run_dir, overwrite=True))
    except (ExportError, ConfigError) as exc:
        return _fail("demo", f"export: {exc}")
    print(f"exported: {out} (transformers and ONNX; load it as README.md shows, or "
          f"`megabatch embed {out} --images DIR --out FILE`)")  # fmt: skip
    return 0
