"""One CLIP step at a very large global batch on CPU ranks: time and peak memory per rank.

    torchrun --standalone --nproc_per_node=2 -m megabatch.trainer.bench_train     # make bench-train

Global batch = micro x accumulation x ranks (default 1024 x 32 x 2 = 65,536), tiny
towers on the digits demo shards read in resampled mode. The step is the real one
(GradCache over every micro-batch, the fused loss over all 65,536 pairs, DeepSpeed's
update); loading the micro-batches is timed apart. Rank 0 prints the table and writes
docs/benchmarks-train.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megabatch.trainer.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megabatch.trainer.bench_train", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--micro", type=int, default=1024)
    parser.add_argument("--accumulation", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks-train.md"))
    args = parser.parse_args(argv)

    from megabatch.trainer.launch import init_world
    from megabatch.trainer.train import Trainer

    config = load_config(None, [
        "preset=demo-clip", "data.val=null", "data.resampled=true", "data.num_workers=1",
        f"batch.micro_batch_size={args.micro}", f"batch.accumulation_steps={args.accumulation}",
        "train.max_steps=1", "run_dir=build/bench-train",
    ])  # fmt: skip
    world = init_world()
    config.validate(world.world_size)
    trainer = Trainer(config, world)
    batches = iter(trainer.loader)

    t0 = time.perf_counter()
    micro = [trainer.task.inputs(next(batches), 0, k) for k in range(args.accumulation)]
    load_s = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    result = trainer.train_step(micro)
    loss = result.loss.item()
    dist.barrier()
    step_s = time.perf_counter() - t0

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = torch.tensor([rss], dtype=torch.float64, device=world.device)  # NCCL: on the GPU
    peaks = [torch.zeros_like(peak) for _ in range(world.world_size)]
    dist.all_gather(peaks, peak)
    if world.is_main:
        global_batch = config.global_batch_size(world.world_size)
        rows = [
            "| global batch | micro x accumulation x ranks | step s | samples/s | loading s | loss | peak RSS per rank |",
            "|---:|---|---:|---:|---:|---:|---|",
            f"| {global_batch:,} | {args.micro} x {args.accumulation} x {world.world_size} | {step_s:.1f} | "
            f"{global_batch / step_s:.0f} | {load_s:.1f} | {loss:.3f} | "
            + ", ".join(f"{p.item() / 2**30:.2f} GiB" for p in peaks)
            + " |",
        ]
        table = "\n".join(rows)
        print(table)
        note = (
            f"# Training step benchmark\n\n{dt.date.today().isoformat()}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, tiny CLIP towers (preset demo-clip) on the digits demo "
            f"shards, fused loss backend {config.engine.loss_backend}. Command: `torchrun "
            f"--standalone --nproc_per_node={world.world_size} -m megabatch.trainer.bench_train "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
            "log(65,536) = 11.09: the loss of an untrained model over the whole batch.\n\n"
        )
        tmp = args.output.with_suffix(".md.tmp")
        tmp.write_text(note + table + "\n")
        tmp.replace(args.output)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
