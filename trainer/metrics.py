"""Where step metrics go: one small interface, a JSON-lines sink now (a Prometheus sink
plugs in the same way), and the live progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Protocol


class MetricsSink(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonLinesSink:
    """Appends ``{"step": s, "time": t, ...}`` per call to RUN/metrics.jsonl (resumed runs
    keep appending; a reader takes the last record of each step)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, values: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def progress_line(step: int, max_steps: int, values: dict[str, float], eta_s: float) -> str:
    eta = f"{int(eta_s // 60)}m{int(eta_s % 60):02d}s"
    return (
        f"step {step}/{max_steps}  loss {values['loss']:.4f}  "
        f"{values['samples_per_s']:.0f} samples/s  lr {values['lr']:.2e}  "
        f"scale {_scale(values['logit_scale'])}  data wait {100 * values['data_wait_fraction']:.0f}%  "
        f"ETA {eta}"
    )


def _scale(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "-"  # "-": a loss with no logits


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
