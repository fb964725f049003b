"""Checkpoints: complete or absent, never code, and only as many as asked for.

Layout of one checkpoint, RUN/checkpoints/step00000100/ (the number is the steps done):

    state/        DeepSpeed's files: model states, ZeRO optimizer partitions, scheduler
    rank{r}.pt    rank r's data reader position and RNG states
    method.pt     the method's own state, where it keeps one (MoCo's and BYOL's target
                  network: the same on every rank, written by rank 0)
    meta.json     step, samples seen, that step's loss, world size, the resolved config
    COMPLETE      the marker, written last

Everything is written under ``.tmp-step00000100/``; once every rank reports its part
written, rank 0 adds meta.json and the marker and renames the directory into place, so a
``stepNNNNNNNN`` directory is whole (a killed save leaves only ``.tmp-*``, removed by the
next save). If any rank fails to write (a full disk, most often) no rank goes on as if it
had saved: every rank raises CheckpointWriteError and the previous checkpoint stays as it was.
Names that are not ``step`` and eight digits (``step00000004.bak``, a user's copy) are
not checkpoints and are left alone.

Loading never unpickles more than ``torch.load(weights_only=True)`` allows: DeepSpeed's
files go through ``WeightsOnlyCheckpointEngine`` (DeepSpeed's own loader would unpickle
them with weights_only=False, so a planted file could run code), allowing on top of
tensors and containers only the three plain DeepSpeed types its ZeRO optimizer files
hold. A file that needs anything else is refused with a CheckpointError naming it.

``model_weights`` is the model alone, whole, for ``megabatch export``: the module file,
with the float32 master weights gathered from the ZeRO optimizer partitions for bf16 and
fp16 runs.

Retention: after each save rank 0 removes all but the newest ``keep`` complete
checkpoints; the newest is the one just completed, so a checkpoint is only ever removed
once a newer one is whole.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megabatch.trainer.console import first_line

COMPLETE = "COMPLETE"
META = "meta.json"
METHOD_STATE = "method.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"  # under state/: DeepSpeed's module weights
_NAME = re.compile(r"step(\d{8})")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or is refused; the one-line message names the file."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk, most often); the previous one
    is intact."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict

    @property
    def loss_is_finite(self) -> bool:
        # Checkpoints written before the loss was recorded count as finite.
        loss = self.meta.get("loss", 0.0)
        return isinstance(loss, (int, float)) and math.isfinite(loss)


def checkpoint_name(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """The complete checkpoints under ``root``, oldest first. Other names, directories
    without the marker and unreadable meta.json files are not checkpoints."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.fullmatch(path.name)
        if match is None or not (path / COMPLETE).is_file():
            continue
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(meta, dict):
            found.append(Checkpoint(path, int(match.group(1)), meta))
    return sorted(found, key=lambda c: c.step)


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint directory named by the user (``train.resume=PATH``), checked."""
    match = _NAME.fullmatch(path.name)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    if match is None or not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (a stepNNNNNNNN directory with a "
            f"{COMPLETE} marker)"
        )
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / META}: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META} does not hold a mapping")
    return Checkpoint(path, int(match.group(1)), meta)


# --------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every generator's state, as tensors and plain lists (loadable with weights_only)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# --------------------------------------------------------------------------- saving
def save(engine, root: Path, step: int, rank: int, device: torch.device, meta: dict,
         rank_state: dict, keep: int | None, method_state: dict | None = None) -> Path:  # fmt: skip
    """Collective: every rank calls it. Returns the final directory; raises
    CheckpointWriteError on every rank when any rank could not write its part.
    ``method_state`` (``Task.state_dict()``) is written by rank 0 when not empty."""
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".tmp-{checkpoint_name(step)}", root / checkpoint_name(step)
    if rank == 0:
        for stale in root.glob(".tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        for old in root.glob(".old-step*"):  # a save of a step again, killed mid-swap
            kept = root / old.name[len(".old-") :]
            if kept.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # the new one never took its place: the old one is the checkpoint
                old.rename(kept)
    dist.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(tmp), tag="state", save_latest=False)
        torch.save(rank_state, tmp / f"rank{rank}.pt")
        if rank == 0 and method_state:
            torch.save(method_state, tmp / METHOD_STATE)
        if rank == 0:
            _write_durably(tmp / META, json.dumps(meta))
            _write_durably(tmp / COMPLETE, str(step))
    except (OSError, RuntimeError) as exc:
        failure = _describe_write_failure(exc, tmp, step, root)
    # Every rank learns whether every part was written: a save is all or nothing.
    failed = torch.tensor([int(failure is not None)], dtype=torch.int32, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    if failed.item():
        dist.barrier()  # every rank has stopped writing before rank 0 removes the parts
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            failure
            or f"checkpoint step {step} not saved: {failed.item()} rank(s) could not "
            f"write their part (see their errors); {_previous(root)}"
        )
    if rank == 0:
        old = root / f".old-{checkpoint_name(step)}"
        if final.exists():  # the same step saved again (resumed from an older checkpoint)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None:
            prune(root, keep)
    dist.barrier()
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints; returns what was removed."""
    removed = [c.path for c in complete_checkpoints(root)[:-keep]]
    for path in removed:
        # The marker goes first: a removal cut short leaves an incomplete directory,
        # which is never taken for a checkpoint.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _describe_write_failure(exc: BaseException, tmp: Path, step: int, root: Path) -> str:
    """One line for a failed write; a full disk is said as such (torch reports it as
    'basic_ios::clear: iostream error' or 'PytorchStreamWriter failed writing file')."""
    text = first_line(exc)
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if not full and free is not None:
        full = free < 1 << 20 or "No space left" in text or "iostream error" in text
    if full:
        what = f"{free / 2**20:.1f} MiB free" if free is not None else "no space left"
        return (f"checkpoint step {step} not saved: the disk holding {root} is full ({what}); "
                f"{_previous(root)}")  # fmt: skip
    return f"checkpoint step {step} not saved: cannot write {tmp}: {text}; {_previous(root)}"


def _previous(root: Path) -> str:
    found = complete_checkpoints(root)
    return f"the previous checkpoint {found[-1].path} is intact" if found else "no checkpoint yet"


# --------------------------------------------------------------------------- loading
# The non-tensor types DeepSpeed's ZeRO 1/2 optimizer files hold (from
# torch.serialization.get_unsafe_globals_in_checkpoint on fp32, bf16 and fp16 runs): plain
# data classes and an enum, whose unpickling sets attributes and runs no code of the file's.
_DEEPSPEED_TYPES = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


def load_weights_only(path: Path, map_location=None):
    """``torch.load`` that runs no code from the file: weights_only, with DeepSpeed's
    plain types allowed. Anything else is a CheckpointError naming the file."""
    try:
        # Only the types this file holds: a module file needs none, and then DeepSpeed
        # (slow to import, and noisy where it finds no GPU) is not imported at all.
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a readable checkpoint: torch.load says why below
        needed = set()
    allowed = [getattr(importlib.import_module(m), n) for m, n in _DEEPSPEED_TYPES
               if f"{m}.{n}" in needed]  # fmt: skip
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        try:
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only for the message
            unsafe = "objects"
        raise CheckpointError(
            f"refusing to load {path}: it needs {unsafe}, which a weights-only load does not "
            "allow (a file megabatch did not write, or one that was tampered with)"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None


def _weights_only_engine(config_params):
    """DeepSpeed's torch checkpoint engine with ``load`` through load_weights_only: every
    file DeepSpeed's load_checkpoint reads goes through its engine's ``load``."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(Path(path), map_location)

    return WeightsOnlyCheckpointEngine(config_params)


def load(engine, checkpoint: Checkpoint, rank: int) -> dict:
    """Restore model, optimizer and scheduler in place; returns this rank's state (data
    position, RNG)."""
    _load_deepspeed(engine, checkpoint, module_only=False)
    return load_weights_only(checkpoint.path / f"rank{rank}.pt")


def load_method_state(checkpoint: Checkpoint) -> dict:
    """The method's own state (``Task.load_state_dict``'s input), read weights-only; {}
    where the checkpoint has none."""
    path = checkpoint.path / METHOD_STATE
    return load_weights_only(path, map_location="cpu") if path.exists() else {}


def load_module(engine, checkpoint: Checkpoint) -> None:
    """The model's weights only (evaluation): no optimizer, scheduler or rank files read."""
    _load_deepspeed(engine, checkpoint, module_only=True)


def _load_deepspeed(engine, checkpoint: Checkpoint, module_only: bool) -> None:
    states = checkpoint.path / "state"
    if not any(states.glob("mp_rank_*_model_states.pt")):
        # DeepSpeed would fail on a bare assert.
        raise CheckpointError(f"cannot read {checkpoint.path}: no model states in {states}")
    engine.checkpoint_engine = _weights_only_engine(engine._config)
    load_path, _ = engine.load_checkpoint(
        str(checkpoint.path), tag="state", load_module_strict=True,
        load_optimizer_states=not module_only, load_lr_scheduler_states=not module_only,
        load_module_only=module_only,
    )  # fmt: skip
    if load_path is None:
        raise CheckpointError(f"cannot read {checkpoint.path}: DeepSpeed found no checkpoint")


# --------------------------------------------------------------------------- whole weights


def model_weights(checkpoint: Checkpoint) -> dict:
    """The model's whole weights (``megabatch export``), read weights-only. ZeRO stages 1
    and 2 partition optimizer states, not parameters: rank 0's module file holds every
    weight, in the training precision. For fp32 runs those are the trained weights; for
    bf16 and fp16 runs the float32 master weights replace them: gathered from the ranks'
    optimizer partitions under ZeRO 1-2 (``zero_master_weights``), read whole from the
    module file without ZeRO (``whole_master_weights``)."""
    path = checkpoint.path / "state" / MODEL_STATES
    if not path.is_file():
        raise CheckpointError(f"cannot read {checkpoint.path}: no state/{MODEL_STATES}")
    states = load_weights_only(path, map_location="cpu")
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"cannot read {path}: it holds no module weights")
    low = any(t.is_floating_point() and t.dtype != torch.float32 for t in module.values())
    if not low:
        return dict(module)
    if any((checkpoint.path / "state").glob("*zero_pp_rank_*_optim_states.pt")):
        return {**module, **zero_master_weights(checkpoint, states)}
    return {**module, **whole_master_weights(path, states)}


def whole_master_weights(path: Path, states: dict) -> dict:
    """The float32 master copy of every trained parameter of a bf16/fp16 run without ZeRO.
    DeepSpeed's FP16_Optimizer keeps them whole in the module file, under
    ``optimizer.fp32_groups``: one list per optimizer group, in the order the trainer
    built the groups (``engine.param_groups``: [decay, no decay], each in the model's
    parameter order), with no names and (stage 0) no ``param_shapes``. Names are put
    back by that order and checked: same shapes, and each master rounds to the module's
    low-precision weight exactly (what the optimizer's step copies into the model)."""
    from megabatch.trainer.engine import decays

    module = states["module"]
    groups = (states.get("optimizer") or {}).get("fp32_groups")
    if not isinstance(groups, list) or len(groups) != 2:
        raise CheckpointError(f"cannot read {path}: its bf16/fp16 weights come with no "
                              "float32 master copy (optimizer.fp32_groups)")  # fmt: skip
    buffers, frozen = states.get("buffer_names") or (), states.get("frozen_param_shapes") or ()
    names = [n for n in module if n not in set(buffers) | set(frozen)]
    by_group = [[n for n in names if decays(module[n])],
                [n for n in names if not decays(module[n])]]  # fmt: skip
    weights = {}
    for group, (masters, group_names) in enumerate(zip(groups, by_group, strict=True)):
        if len(masters) != len(group_names):
            raise CheckpointError(f"cannot read {path}: optimizer group {group} holds "
                                  f"{len(masters)} master weights, the model {len(group_names)} "
                                  "parameters")  # fmt: skip
        for name, master in zip(group_names, masters, strict=True):
            own = module[name]
            if master.shape != own.shape or not torch.equal(master.to(own.dtype), own):
                raise CheckpointError(f"cannot read {path}: the float32 master of {name} "
                                      "does not round to its weight")  # fmt: skip
            weights[name] = master.float().clone()
    return weights


def zero_master_weights(checkpoint: Checkpoint, states: dict | None = None) -> dict:
    """The float32 master copy of every trained parameter, gathered from the ZeRO 1/2
    optimizer partitions (one file per data-parallel rank): the ranks' flat partitions of
    each parameter group are joined in rank order and cut at the parameter shapes the
    module file lists (deepspeed.utils.zero_to_fp32's reconstruction, weights-only)."""
    state_dir = checkpoint.path / "state"
    if states is None:
        states = load_weights_only(state_dir / MODEL_STATES, map_location="cpu")
    world = states.get("dp_world_size", 1)
    parts = []
    for rank in range(world):
        # bf16 runs' files are named bf16_zero_pp_rank_*.
        found = sorted(state_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        if len(found) != 1:
            raise CheckpointError(f"cannot read {checkpoint.path}: rank {rank}'s ZeRO optimizer "
                                  f"file is missing (written by {world} ranks)")  # fmt: skip
        path = found[0]
        optim = load_weights_only(path, map_location="cpu").get("optimizer_state_dict", {})
        if "single_partition_of_fp32_groups" not in optim:
            raise CheckpointError(f"{path} holds no ZeRO 1/2 fp32 partitions")
        parts.append(optim)
    paddings = parts[0].get("param_alignment_paddings")
    weights = {}
    for g, shapes in enumerate(states["param_shapes"]):
        flat = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            weights[name] = flat.narrow(0, offset, n).view(tuple(shape)).clone()
            offset += n + (paddings[g][i] if paddings is not None else 0)
        align = 2 * world  # ZeRO 2 pads each group to a multiple of 2 x world size
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise CheckpointError(f"cannot read {state_dir}: group {g} holds {flat.numel()} "
                                  f"values, its parameters {offset}")  # fmt: skip
    for name, source in states.get("shared_params", {}).items():
        if source in weights:
            weights[name] = weights[source]
    return weights
