"""``megabatch train``, ``megabatch eval`` and ``megabatch demo``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config

DEMO_DATA = Path("data/digits")


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train CLIP or SimCLR (under torchrun/srun for several ranks)",
        description="Train from a YAML config with key=value overrides, e.g. "
        "`megabatch train run.yaml optim.lr=3e-4`. Writes RUN/config.yaml, metrics.jsonl, "
        "checkpoints/, results.json and plots/. Exit status 75 after a SIGTERM/SIGUSR1 "
        "save: requeue the job and it resumes (train.resume=auto).",
    )
    train.add_argument("config", nargs="?", help="YAML config (optional with preset=...)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
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
        help="build the digits demo, train the tiny CLIP on 2 CPU ranks, evaluate",
        description="Writes the demo shards and tokenizer under data/digits if missing, "
        "trains preset demo-clip with torchrun on 2 ranks, and prints the evaluation.",
    )
    demo.add_argument("--ranks", type=int, default=2)
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    demo.set_defaults(func=_cmd_demo)


def _fail(command: str, message: str) -> int:
    print(f"megabatch {command}: error: {message}", file=sys.stderr)
    return 2


def _world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _cmd_train(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # only overrides were given
        config_path, overrides = None, [config_path, *overrides]
    try:
        config = load_config(config_path, overrides)
        config.validate(world_size=_world_size_from_env())  # before any process group
    except ConfigError as exc:
        return _fail("train", str(exc))
    return _run(config, evaluate_only=False)


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.run_dir / "config.yaml", ["train.resume=auto", *args.overrides])
        config.validate(world_size=_world_size_from_env())
    except ConfigError as exc:
        return _fail("eval", str(exc))
    return _run(config, evaluate_only=True)


def _run(config, evaluate_only: bool) -> int:
    from trainer.launch import init_world
    from trainer.train import NonFiniteLossError, Trainer

    world = init_world()
    trainer = Trainer(config, world)
    try:
        if evaluate_only:
            results = trainer.evaluate_checkpoint()
            if world.is_main:
                print(json.dumps(results, indent=2))
            return 0
        return trainer.train()["exit_code"]
    except NonFiniteLossError as exc:
        if world.is_main:
            print(f"megabatch train: error: {exc}", file=sys.stderr)
        return 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from data_pipeline.demo import write_demo
    from data_pipeline.tokenizer import CaptionTokenizer, captions_from_shards

    if not (DEMO_DATA / "train" / "manifest.json").is_file():
        print(f"writing the digits demo shards to {DEMO_DATA}", file=sys.stderr)
        write_demo(DEMO_DATA)
    tokenizer = DEMO_DATA / "tokenizer.json"
    if not tokenizer.is_file():
        captions = list(captions_from_shards(str(DEMO_DATA / "train")))
        CaptionTokenizer.train(captions, vocab_size=1000).save(tokenizer)
    config = load_config(None, ["preset=demo-clip", *args.overrides])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.ranks}", "-m", "trainer.cli", "train",
               "preset=demo-clip", *args.overrides]  # fmt: skip
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
    return 0
