"""The training loop: ``Trainer.train()`` -> ``train_step()`` (trainer.step, GradCache).

Reads top to bottom: resume if asked, then per step take A micro-batches from the
loader, run the GradCache step, and on the schedule log, checkpoint and evaluate. A
SIGTERM or SIGUSR1 (Slurm's warning before preemption) makes every rank save at the end
of the current step and exit with EXIT_REQUEUE. A non-finite loss skips the step's
update; ``train.max_nonfinite_steps`` of them in a row stop the run with the last good
checkpoint intact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.loader import LoaderConfig, ShardLoader
from trainer import checkpoint
from trainer.config import RunConfig, dump_config
from trainer.engine import build_engine
from trainer.eval_run import evaluate
from trainer.launch import World
from trainer.metrics import JsonLinesSink, print_progress, progress_line
from trainer.step import gradcache_step
from trainer.tasks import make_task

EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: saved on a signal; requeue and resume=auto


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, config: RunConfig, world: World):
        self.config, self.world = config, world
        self.run_dir = Path(config.run_dir)
        self.task = make_task(config, world.device, world.world_size)
        torch.manual_seed(config.seed)  # same initial weights on every rank
        model = self.task.build_model().to(world.device)
        self.engine, self.scheduler = build_engine(model, config)
        self.loader = ShardLoader(
            LoaderConfig(
                shards=config.data.train, task=config.task, seed=config.seed,
                batch_size=config.batch.micro_batch_size, num_workers=config.data.num_workers,
                shuffle_block=config.data.shuffle_block, resampled=config.data.resampled,
                drop_last=True, image=self.task.image, tokenizer=config.data.tokenizer,
                context_length=config.model.context_length,
            ),
            rank=world.rank, world_size=world.world_size,
        )  # fmt: skip
        self.sink = JsonLinesSink(self.run_dir / "metrics.jsonl") if world.is_main else None
        self.step, self.samples_seen, self.nonfinite_in_a_row = 0, 0, 0
        self._signalled = False
        self._batches = None

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg = self.config
        self._write_run_files()
        self._resume()
        self._install_signal_handlers()
        self._batches = self._endless_batches()
        last_save, last_log = time.monotonic(), (time.monotonic(), self.step)
        saved_step, wait = self.step if self.step else None, 0.0
        while self.step < cfg.train.max_steps:
            t0 = time.monotonic()
            micro = [self.task.inputs(next(self._batches), self.step, k)
                     for k in range(cfg.batch.accumulation_steps)]  # fmt: skip
            wait += time.monotonic() - t0
            result = self.train_step(micro)
            self.step += 1
            self.samples_seen += cfg.global_batch_size(self.world.world_size)

            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                now = time.monotonic()
                elapsed, steps = now - last_log[0], self.step - last_log[1]
                self._log(result, elapsed, steps, wait)
                last_log, wait = (now, self.step), 0.0
            minutes = cfg.train.checkpoint_every_minutes
            due = (
                cfg.train.checkpoint_every_steps
                and self.step % cfg.train.checkpoint_every_steps == 0
            ) or (minutes is not None and time.monotonic() - last_save > 60 * minutes)
            save, stop = self._agree(bool(due), self._signalled)
            if save or stop:
                self.save()
                last_save, saved_step = time.monotonic(), self.step
            if stop:
                return {"exit_code": EXIT_REQUEUE}
            last = self.step == cfg.train.max_steps  # the final evaluation follows
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not last:
                self._evaluate()
        if saved_step != self.step:  # the end, unless this very step was just saved
            self.save()
        results = self._evaluate(final=True)
        if self.world.is_main:
            from trainer.plots import write_plots

            write_plots(self.run_dir)
        return {"exit_code": 0, **results}

    def evaluate_checkpoint(self) -> dict:
        """Load the newest complete checkpoint (train.resume) and evaluate it."""
        self._resume()
        return self._evaluate(final=True)

    def train_step(self, micro_batches):
        scale_fn = self.task.scale if self.task.name == "clip" else None
        result = gradcache_step(self.engine, micro_batches, self.task.encode, self.task.loss,
                                scale_fn, self.world.world_size, skip_nonfinite=True)  # fmt: skip
        if result.skipped:
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.config.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step}; "
                    f"stopped, the last good checkpoint in {self.run_dir / 'checkpoints'} is intact"
                )
        else:
            self.nonfinite_in_a_row = 0
        return result

    # ------------------------------------------------------------------ pieces
    def _endless_batches(self):
        while True:  # epochs back to back; each rank's stream is its own
            yield from self.loader

    def _agree(self, save: bool, stop: bool) -> tuple[bool, bool]:
        """Every rank must take the same decision (a save is collective): OR over ranks."""
        # On the rank's device: NCCL reduces only GPU tensors.
        flags = torch.tensor([int(save), int(stop)], dtype=torch.int32, device=self.world.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def _log(self, result, elapsed: float, steps: int, wait: float) -> None:
        loss = result.loss.item()  # host syncs on logging steps only
        values = {
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": result.logit_scale.item() if result.logit_scale is not None
            else 1 / self.config.loss.temperature,
            "samples_per_s": steps * self.config.global_batch_size(self.world.world_size) / max(elapsed, 1e-9),
            "step_time_s": elapsed / max(steps, 1),
            "data_wait_fraction": min(1.0, wait / max(elapsed, 1e-9)),
            "skipped_samples": float(sum(self.loader.skipped_total.values())),
            "nonfinite_steps": float(self.nonfinite_in_a_row),
            "samples_seen": float(self.samples_seen),
        }  # fmt: skip
        if self.sink is not None:
            self.sink.write(self.step, values)
            remaining = (self.config.train.max_steps - self.step) * values["step_time_s"]
            print_progress(progress_line(self.step, self.config.train.max_steps, values, remaining))

    def save(self) -> None:
        meta = {"step": self.step, "samples_seen": self.samples_seen}
        state = {"data": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        checkpoint.save(
            self.engine, self.run_dir / "checkpoints", self.step, self.world.rank, meta, state
        )

    def _resume(self) -> None:
        mode = self.config.train.resume
        if mode == "none":
            return
        if mode == "auto":
            found = checkpoint.complete_checkpoints(self.run_dir / "checkpoints")
            if not found:
                return
            path = found[-1]
        else:
            path = Path(mode)
        meta, state = checkpoint.load(self.engine, path, self.world.rank)
        self.step, self.samples_seen = meta["step"], meta["samples_seen"]
        self.loader.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        if self.world.is_main:
            print_progress(f"resumed from {path} at step {self.step}")

    def _evaluate(self, final: bool = False) -> dict:
        results = evaluate(self.task, self.engine.module, self.config) if self.world.is_main else {}
        if self.world.is_main and results:
            if self.sink is not None:
                self.sink.write(self.step, {f"eval/{k}": v for k, v in results.items()})
            if final:
                (self.run_dir / "results.json").write_text(
                    json.dumps({"step": self.step, **results}, indent=2) + "\n"
                )
            print_progress("eval: " + "  ".join(f"{k} {v:.3f}" for k, v in results.items()))
        dist.barrier()
        return results

    def _write_run_files(self) -> None:
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.config, self.run_dir / "config.yaml",
                        extra={"git_revision": _git_revision(),
                               "world_size": self.world.world_size,
                               "global_batch_size": self.config.global_batch_size(self.world.world_size)})  # fmt: skip
        dist.barrier()

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._signalled = True

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


__all__ = ["EXIT_REQUEUE", "NonFiniteLossError", "Trainer"]
