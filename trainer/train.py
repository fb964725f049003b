"""The training loop: ``Trainer.train()`` -> ``train_step()`` (trainer.step: GradCache, or
plain accumulation, as the task's ``step_kind`` says).

Reads top to bottom: resume if asked (trainer.resume decided which checkpoint, before any
process group), then per step take A micro-batches from the loader, run the task's step
and its after-step update, and on the schedule log, checkpoint and evaluate.

Signals: SIGTERM, SIGUSR1 or SIGUSR2 (Slurm's warning before preemption) makes every rank save at
the end of the current step and exit with EXIT_REQUEUE (the DataLoader workers ignore
them: the rank decides). A signal that arrives while the rank waits for its data gives
the batch DATA_WAIT_GRACE_S to arrive; if it does not, the rank exits EXIT_REQUEUE
without saving (a save is collective and the step is half-taken), and the newest
checkpoint is where the requeued run resumes.

Non-finite losses skip the step's update; no checkpoint is written during such a streak
(its weights are what made the loss non-finite), and ``train.max_nonfinite_steps`` of them
in a row stop the run, naming the newest checkpoint, which resume=auto starts from.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist

from megabatch.data_pipeline.read.loader import ShardLoader
from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.trainer import checkpoint
from megabatch.trainer.config import RunConfig, dump_config, plain_dict
from megabatch.trainer.data import load_tokenizer, loader_config
from megabatch.trainer.engine import apply_optimizer_config, build_engine
from megabatch.trainer.eval_run import evaluate
from megabatch.trainer.launch import World
from megabatch.trainer.losses import logged_scale
from megabatch.trainer.metrics import JsonLinesSink, MetricsSink, print_progress, progress_line
from megabatch.trainer.prometheus import (
    MetricsServer,
    PrometheusSink,
    target_host,
    withdraw_targets,
    write_targets,
)
from megabatch.trainer.resume import ResumePlan, plan_resume
from megabatch.trainer.step import STEPS
from megabatch.trainer.stop_signals import EXIT_REQUEUE, StopSignals
from megabatch.trainer.tasks import TASKS, make_task

# Seconds a signalled rank still waits for its batch. Long enough for a batch that is
# merely slow (the step then ends and saves as usual), short against schedulers' grace
# periods (Kubernetes: 30 s by default; Slurm: --signal's lead time, KillWait).
DATA_WAIT_GRACE_S = 10.0


class NonFiniteLossError(RuntimeError):
    pass


class SignalledWhileWaitingForData(Exception):
    """Raised from SIGALRM: a signal came while this rank waited for data, and no batch
    came within DATA_WAIT_GRACE_S."""


class Trainer:
    def __init__(self, config: RunConfig, world: World, plan: ResumePlan | None = None,
                 signals: StopSignals | None = None,
                 tokenizer: CaptionTokenizer | None = None,
                 metrics_server: MetricsServer | None = None):  # fmt: skip
        """``plan`` and ``tokenizer`` as the checks before the run found them
        (``preflight.check_run``), ``metrics_server`` as the command started it before
        the process group (``metrics.prometheus``); each made here when not given
        (benchmarks, tests)."""
        self.config, self.world = config, world
        self.signals = signals if signals is not None else StopSignals()
        self.run_dir = Path(config.run_dir)
        self.plan = plan if plan is not None else plan_resume(config, world.world_size)
        captions = TASKS[config.task].captions
        if tokenizer is None and captions:
            tokenizer = load_tokenizer(config)
        self.task = make_task(config, world.device, world.world_size, tokenizer)
        torch.manual_seed(config.seed)  # same initial weights on every rank
        model = self.task.build_model().to(world.device)
        self.engine, self.scheduler = build_engine(model, config)
        self.loader = ShardLoader(loader_config(config, config.data.train, captions=captions),
                                  rank=world.rank, world_size=world.world_size,
                                  tokenizer=tokenizer)  # fmt: skip
        self.sinks = build_sinks(config, world, self.run_dir, metrics_server)
        self.nonfinite_total = 0
        self.step, self.samples_seen, self.nonfinite_in_a_row = 0, 0, 0
        self._waiting_for_data = False

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        cfg = self.config
        self._write_run_files()
        self._resume()
        self._install_signal_handlers()
        batches = self._endless_batches()
        last_save, last_log = time.monotonic(), (time.monotonic(), self.step)
        saved_step, wait = self.step if self.step else None, 0.0
        while self.step < cfg.train.max_steps:
            t0 = time.monotonic()
            try:
                micro = self._next_micro_batches(batches)
            except SignalledWhileWaitingForData:
                self._say(f"{self.signals.received} while waiting for data: no batch came within "
                          f"{DATA_WAIT_GRACE_S:g} s; exiting for requeue without a save "
                          f"({self._newest_checkpoint()})", every_rank=True)  # fmt: skip
                return {"exit_code": EXIT_REQUEUE}
            wait += time.monotonic() - t0
            self._phase("step")
            result = self.train_step(micro)
            self.step += 1
            if not result.skipped:  # the method's own update (a momentum encoder's EMA)
                self.task.after_optimizer_step(self.engine.module, self.step)
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
            self._phase("agree")
            save, stop = self._agree(bool(due), self.signals.received is not None)
            # The loss is the same on every rank, so every rank takes the same branch.
            if (save or stop) and result.skipped:
                if stop or self.nonfinite_in_a_row == 1:  # said once a streak, or on leaving
                    self._say(f"step {self.step}: no checkpoint during a non-finite streak")
            elif save or stop:
                self.save(result.loss)
                last_save, saved_step = time.monotonic(), self.step
            if stop:
                return {"exit_code": EXIT_REQUEUE}
            last = self.step == cfg.train.max_steps  # the final evaluation follows
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not last:
                self._evaluate()
        if saved_step != self.step and self.nonfinite_in_a_row == 0:
            self.save(result.loss)  # the end, unless this very step was just saved
        results = self._evaluate(final=True)
        if self.world.is_main:
            from megabatch.trainer.plots import write_plots

            write_plots(self.run_dir)
        return {"exit_code": 0, **results}

    def evaluate_checkpoint(self) -> dict:
        """Load the model of the checkpoint the plan names and evaluate it."""
        if self.plan.checkpoint is None:
            raise checkpoint.CheckpointError(
                f"no complete checkpoint to evaluate in {self.run_dir / 'checkpoints'}"
            )
        checkpoint.load_module(self.engine, self.plan.checkpoint)
        self.step = self.plan.checkpoint.step
        self._say(f"evaluating {self.plan.checkpoint.path} (step {self.step})")
        return self._evaluate(final=True)

    def train_step(self, micro_batches):
        step = STEPS[self.task.step_kind]
        result = step(self.engine, micro_batches, self.task.encode, self.task.loss,
                      self.task.loss_params, self.world.world_size, targets=self.task.targets,
                      skip_nonfinite=True)  # fmt: skip
        if result.skipped:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_a_row >= self.config.train.max_nonfinite_steps:
                n, last = self.nonfinite_in_a_row, self.step + 1  # 1-based, as logged
                first = last - n + 1
                found = checkpoint.complete_checkpoints(self.run_dir / "checkpoints")
                hint = ""
                if found and found[-1].step == first - 1:  # its weights gave the first one
                    hint = (f" (its weights gave step {first}'s non-finite loss: lower optim.lr, "
                            "or train.resume=PATH an earlier checkpoint)")  # fmt: skip
                raise NonFiniteLossError(
                    f"{n} non-finite losses in a row (steps {first}-{last}); stopped. No "
                    f"checkpoint was written during the streak: {_describe_newest(found)}, "
                    f"which train.resume=auto starts from{hint}"
                )
        else:
            self.nonfinite_in_a_row = 0
        return result

    # ------------------------------------------------------------------ pieces
    def _endless_batches(self):
        while True:  # epochs back to back; each rank's stream is its own
            yield from self.loader

    def _next_micro_batches(self, batches) -> list:
        """The step's A micro-batches. Signals are honoured here too: see the module's
        docstring (SIGALRM, armed by the signal handler, ends a wait that outlasts the
        grace period)."""
        self._phase("data")
        self._waiting_for_data = True
        try:
            if self.signals.received is not None:  # signalled before this wait
                signal.setitimer(signal.ITIMER_REAL, DATA_WAIT_GRACE_S)
            return [self.task.inputs(next(batches), self.step, k)
                    for k in range(self.config.batch.accumulation_steps)]  # fmt: skip
        finally:
            self._waiting_for_data = False
            signal.setitimer(signal.ITIMER_REAL, 0)

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
            # The learning rate of the next step (the scheduler has stepped).
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "logit_scale": logged_scale(self.config, result.loss_params),
            "samples_per_s": steps * self.config.global_batch_size(self.world.world_size) / max(elapsed, 1e-9),
            "step_time_s": elapsed / max(steps, 1),
            "data_wait_fraction": min(1.0, wait / max(elapsed, 1e-9)),
            "skipped_samples": float(sum(self.loader.skipped_total.values())),
            "nonfinite_steps": float(self.nonfinite_in_a_row),
            "samples_seen": float(self.samples_seen),
            # What the counters of the Prometheus sink add up (this process's totals).
            "logged_steps": float(steps),
            "data_wait_s": wait,
            "nonfinite_steps_total": float(self.nonfinite_total),
            **{f"skipped_samples/{k}": float(v) for k, v in self.loader.skipped_total.items()},
        }  # fmt: skip
        self._publish(values)
        if self.world.is_main:
            remaining = (self.config.train.max_steps - self.step) * values["step_time_s"]
            print_progress(progress_line(self.step, self.config.train.max_steps, values, remaining))

    def save(self, loss: torch.Tensor) -> None:
        """A checkpoint of the state after ``self.step`` steps, whose last loss was ``loss``
        (finite: the loop never saves during a non-finite streak)."""
        self._phase("save")
        meta = {"step": self.step, "samples_seen": self.samples_seen, "loss": loss.item(),
                "world_size": self.world.world_size, "config": plain_dict(self.config)}  # fmt: skip
        state = {"data": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        started = time.monotonic()
        try:
            path = checkpoint.save(self.engine, self.run_dir / "checkpoints", self.step,
                                   self.world.rank, self.world.device, meta, state,
                                   keep=self.config.train.keep_checkpoints,
                                   method_state=self.task.state_dict())  # fmt: skip
        except checkpoint.CheckpointWriteError:
            self._publish({"checkpoint/failed": 1.0})
            raise
        if self.world.is_main:  # the checkpoint's global values, from rank 0 (as all are)
            self._publish({"checkpoint/duration_s": time.monotonic() - started,
                           "checkpoint/bytes": float(_folder_bytes(path)),
                           "checkpoint/time": time.time()})  # fmt: skip

    def _publish(self, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.write(self.step, values)

    def close(self, status: int) -> None:
        """After the command: sinks closed; a run that finished or stopped for requeue
        leaves Prometheus's discovery (a crashed one stays, so that its targets alert)."""
        for sink in self.sinks:
            sink.close()
        if status in (0, EXIT_REQUEUE) and self.world.is_main:
            withdraw_targets(self.run_dir)

    def _resume(self) -> None:
        found = self.plan.checkpoint
        if found is None:
            return
        state = checkpoint.load(self.engine, found, self.world.rank)
        apply_optimizer_config(self.engine, self.scheduler, self.config)
        self.step, self.samples_seen = found.meta["step"], found.meta["samples_seen"]
        self.loader.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        try:
            self.task.load_state_dict(checkpoint.load_method_state(found))
        except ValueError as exc:
            raise checkpoint.CheckpointError(f"cannot resume from {found.path}: {exc}") from None
        self._say(f"resumed from {found.path} at step {self.step}")
        for line in self.plan.describe():
            self._say(line)

    def _evaluate(self, final: bool = False) -> dict:
        """Rank 0 evaluates while the others wait for it as long as it is alive (not a
        barrier: an evaluation may outlast the collective timeout)."""
        self._phase("eval" if self.world.is_main else "eval-wait")
        results = evaluate(self.task, self.engine.module, self.config) if self.world.is_main else {}
        if self.world.peers is not None:
            name = f"eval-step{self.step}-{'final' if final else 'periodic'}"
            if self.world.is_main:
                self.world.peers.announce(name)
            else:
                self.world.peers.wait_for(0, name)
        if self.world.is_main and results:
            self._publish({f"eval/{k}": v for k, v in results.items()})
            if final:
                (self.run_dir / "results.json").write_text(
                    json.dumps({"step": self.step, **results}, indent=2) + "\n"
                )
            print_progress("eval: " + "  ".join(f"{k} {v:.3f}" for k, v in results.items()))
        dist.barrier()
        return results

    def _write_run_files(self) -> None:
        """RUN/config.yaml: the config this start runs with (what ``megabatch eval``
        rebuilds); RUN/configs/NNN.yaml: every start's, in order, kept."""
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            history = self.run_dir / "configs"
            history.mkdir(exist_ok=True)
            start = len(list(history.glob("[0-9][0-9][0-9].yaml")))
            found = self.plan.checkpoint
            extra = {"git_revision": _git_revision(), "world_size": self.world.world_size,
                     "global_batch_size": self.config.global_batch_size(self.world.world_size),
                     "started": datetime.now(UTC).isoformat(timespec="seconds"),
                     "resumed_from": found.path if found else "none",
                     "changed_on_resume": ", ".join(map(str, self.plan.applied)) or "none"}  # fmt: skip
            dump_config(self.config, history / f"{start:03d}.yaml", extra=extra)
            dump_config(self.config, self.run_dir / "config.yaml", extra=extra)
        dist.barrier()

    def _install_signal_handlers(self) -> None:
        def on_stop_signal():
            if self._waiting_for_data:
                signal.setitimer(signal.ITIMER_REAL, DATA_WAIT_GRACE_S)

        def on_alarm(signum, frame):
            if self._waiting_for_data:
                # Again in a second, in case cleanup on the way out blocks too (closing a
                # pipe: source waits for its command); the wait's `finally` disarms it.
                signal.setitimer(signal.ITIMER_REAL, 1.0)
                raise SignalledWhileWaitingForData

        self.signals.on_receive = on_stop_signal
        self.signals.install()
        signal.signal(signal.SIGALRM, on_alarm)

    def _phase(self, name: str) -> None:
        if self.world.peers is not None:
            self.world.peers.phase(self.step, name)

    def _newest_checkpoint(self) -> str:
        return _describe_newest(checkpoint.complete_checkpoints(self.run_dir / "checkpoints"))

    def _say(self, line: str, every_rank: bool = False) -> None:
        if self.world.is_main:
            print_progress(line)
        elif every_rank:
            print_progress(f"rank {self.world.rank}: {line}")


def build_sinks(config: RunConfig, world: World, run_dir: Path,
                server: MetricsServer | None) -> list[MetricsSink]:  # fmt: skip
    """RUN/metrics.jsonl from rank 0; with ``metrics.prometheus``, every rank's /metrics
    and, from rank 0, RUN/prometheus-targets.json naming every rank (a collective)."""
    sinks: list[MetricsSink] = []
    if world.is_main:
        sinks.append(JsonLinesSink(run_dir / "metrics.jsonl"))
    if config.metrics.prometheus:
        if server is None:
            server = MetricsServer.start(config.metrics, world.local_rank)
        sinks.append(PrometheusSink(server, config, world.rank, world.world_size))
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        entry = (target_host(config.metrics), server.port, world.rank, node)
        entries = [entry] * world.world_size
        if world.world_size > 1:
            dist.all_gather_object(entries, entry)
        if world.is_main:
            write_targets(run_dir, run_dir.resolve().name, entries)
    return sinks


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _describe_newest(found: list[checkpoint.Checkpoint]) -> str:
    if not found:
        return "there is no checkpoint yet"
    return f"the newest checkpoint is step {found[-1].step} ({found[-1].path})"


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


__all__ = ["EXIT_REQUEUE", "NonFiniteLossError", "Trainer"]
