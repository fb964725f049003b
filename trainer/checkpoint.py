"""Checkpoints that count only once complete.

Layout: RUN/checkpoints/step00000100/ with DeepSpeed's files (model, optimizer and
scheduler states, written by every rank in parallel), ``rank{r}.pt`` per rank (data
reader position, RNG states) and ``meta.json`` (step, samples seen), and last a
``COMPLETE`` marker. Everything is first written under ``.tmp-step00000100/`` and renamed
after every rank has finished; ``resume=auto`` takes the newest directory that has the
marker, so a checkpoint killed half-way is ignored (and cleaned up by the next save).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def _name(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step")
             and (p / COMPLETE).is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[4:]))


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


def save(engine, root: Path, step: int, rank: int, meta: dict, rank_state: dict) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{_name(step)}"
    final = root / _name(step)
    if rank == 0:
        for stale in root.glob(".tmp-*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="state", save_latest=False)
    torch.save(rank_state, tmp / f"rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (final / COMPLETE).write_text(str(step))
    dist.barrier()
    return final


def load(engine, path: Path, rank: int) -> tuple[dict, dict]:
    """(meta, this rank's state); restores model, optimizer and scheduler in place."""
    engine.load_checkpoint(str(path), tag="state", load_module_strict=True,
                           load_optimizer_states=True, load_lr_scheduler_states=True)  # fmt: skip
    meta = json.loads((path / "meta.json").read_text())
    rank_state = torch.load(path / f"rank{rank}.pt", weights_only=True)
    return meta, rank_state
