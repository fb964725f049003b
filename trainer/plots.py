"""RUN/plots/*.png from RUN/metrics.jsonl: loss, throughput, logit scale, evaluation."""

from __future__ import annotations

import json
from pathlib import Path


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    latest: dict[int, float] = {}  # a resumed run rewrites steps: keep the last value
    for r in records:
        if key in r:
            latest[r["step"]] = r[key]
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def write_plots(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    charts = {
        "loss": (["loss"], "loss"),
        "throughput": (["samples_per_s"], "samples / s"),
        "logit_scale": (["logit_scale"], "logit scale"),
        "evaluation": (sorted({k for r in records for k in r if k.startswith("eval/")}), "score"),
    }
    written = []
    for name, (keys, ylabel) in charts.items():
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            steps, values = _series(records, key)
            ax.plot(steps, values, marker="o" if name == "evaluation" else None, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        target = out_dir / f"{name}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written
