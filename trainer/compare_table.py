"""``megabatch compare``'s report, docs/methods.md: a row per method and baseline, the
issue's targets checked on those rows (met or not, with the margin), and the markdown,
written atomically. This module is that file's one writer; nothing reads it back.

Every figure is a top-1 accuracy in [0, 1] on the held-out split, as
``eval_run.evaluate`` returns it; a margin is the difference in points (100 x the
difference of two such accuracies), positive when the row is ahead of its reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megabatch.trainer.atomic_write import atomic_file

RAW_PIXELS, RANDOM_BACKBONE = "raw-pixels", "random-backbone"
PROBE, KNN, ZERO_SHOT = "linear_probe_top1", "knn_top1", "zeroshot_top1"
# The targets, by row name (compare's rows are named after their presets,
# demo-NAME). Image methods that must reach raw pixels' linear probe:
AT_LEAST_RAW_PIXELS = ("simclr", "moco", "byol")
# CLIP with the SigLIP loss, against the softmax loss's zero-shot top-1:
SIGLIP, SOFTMAX, SIGLIP_TOLERANCE = "clip-siglip", "clip", 0.02
# Accuracies are counts over the same samples: equal ones may differ in the last bits.
_EPS = 1e-9


@dataclass
class Row:
    """One line of the table: a baseline or a trained method."""

    name: str
    """Its id: a baseline's (RAW_PIXELS, RANDOM_BACKBONE) or a method's (``--methods``)."""
    label: str
    """What the table calls it ("SimCLR, margin loss")."""
    kind: str
    """"baseline", "image" (a method without captions) or "caption" (CLIP)."""
    results: dict[str, float] = field(default_factory=dict)
    """``eval_run.evaluate``'s values (RUN/results.json less its step); {} when none."""
    steps: int | None = None
    global_batch: int | None = None
    wall_s: float | None = None
    """The training command's wall time, start-up and final evaluation included."""
    command: str = ""
    """The command line that trained it; a baseline's: how it was made, in words."""
    note: str = ""
    """"reused: ...", "failed: exit status 1": said beside its name."""


@dataclass(frozen=True)
class Target:
    text: str
    met: bool | None
    """None: not measured (the row is missing, failed, or has no such result)."""
    detail: str


@dataclass(frozen=True)
class Provenance:
    """What the header says about how the table was made."""

    command: str
    date: str
    machine: str
    ranks: int
    load: tuple[float, float] | None = None
    """The 1-minute load average when the command started and when it ended."""
    baseline_preset: str = "demo-simclr"
    """The preset whose config the baselines were made from."""


def check_targets(rows: list[Row]) -> list[Target]:
    """Every image method above the random backbone and simclr, moco and byol at or above
    raw pixels (linear probe top-1), and CLIP's SigLIP row within SIGLIP_TOLERANCE of its
    softmax row (zero-shot top-1). A target whose rows are not all here is listed as not
    measured, so that a table missing a method says so."""
    by_name = {row.name: row for row in rows}
    out = []
    for row in rows:
        if row.kind == "image":
            out.append(_compare(row, by_name.get(RANDOM_BACKBONE), PROBE, strict=True,
                                text=f"{row.label} above the random backbone (linear probe)"))  # fmt: skip
    for name in AT_LEAST_RAW_PIXELS:
        row = by_name.get(name)
        text = f"{row.label if row else name} at or above raw pixels (linear probe)"
        if row is None:
            out.append(Target(text, None, f"no {name} row"))
        else:
            out.append(_compare(row, by_name.get(RAW_PIXELS), PROBE, strict=False, text=text))
    siglip, softmax = by_name.get(SIGLIP), by_name.get(SOFTMAX)
    text = (f"CLIP with the SigLIP loss within {100 * SIGLIP_TOLERANCE:g} points of the "
            "softmax loss (zero-shot top-1)")  # fmt: skip
    if siglip is None or softmax is None:
        missing = " or ".join(n for n, r in ((SIGLIP, siglip), (SOFTMAX, softmax)) if r is None)
        out.append(Target(text, None, f"no {missing} row"))
    else:
        out.append(_compare(siglip, softmax, ZERO_SHOT, strict=False, text=text,
                            tolerance=SIGLIP_TOLERANCE))  # fmt: skip
    return out


def _compare(row: Row, reference: Row | None, metric: str, *, strict: bool, text: str,
             tolerance: float = 0.0) -> Target:  # fmt: skip
    """``row``'s ``metric`` against ``reference``'s: met when ahead (``strict``) or not
    behind by more than ``tolerance``."""
    ours = row.results.get(metric)
    theirs = reference.results.get(metric) if reference is not None else None
    if ours is None or theirs is None:
        why = (row.note or f"no {metric}") if ours is None else f"no reference {metric}"
        return Target(text, None, why)
    diff = ours - theirs
    met = diff > _EPS if strict else diff >= -tolerance - _EPS
    limit = f" (limit {-100 * tolerance:+.1f})" if tolerance else ""
    return Target(text, met, f"{ours:.3f} vs {theirs:.3f}: {100 * diff:+.1f} points{limit}")


def render(rows: list[Row], targets: list[Target], provenance: Provenance) -> str:
    p = provenance
    load = (f"; load average {p.load[0]:.1f} when it started, {p.load[1]:.1f} when it ended"
            if p.load else "")  # fmt: skip
    lines = [
        "# Methods compared on the digits",
        "",
        f"Written by `{p.command}` on {p.date}, {p.machine}{load}.",
        "",
        "Every method trained "
        f"from its preset `trainer/presets/demo-NAME.yaml` on {p.ranks} CPU rank(s) "
        "(`megabatch launch`) with the budget below, evaluated once at the end as every run "
        "is (trainer/eval_run.py): a linear probe (logistic regression on standardised "
        "frozen features) and kNN (k = 20, cosine) fitted on the training digits' features "
        "and scored on the held-out digits; CLIP also zero-shot, from the class names and "
        "prompt templates. Baselines, through the same evaluation: raw pixels (each image "
        "as the model receives it, resized and normalised, flattened) and the image "
        f"methods' backbone untrained ({p.baseline_preset}'s model from its seed: a run's step-0 "
        "weights). Wall time: the whole training command, start-up and the final "
        "evaluation included. Regenerate with `make compare` (docs/training.md, "
        '"Comparing methods").',
        "",
        "| method | linear probe top-1 | kNN top-1 | zero-shot top-1 | steps | global batch "
        "| wall time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        name = f"{row.label} ({row.note})" if row.note else row.label
        cells = [name, _top1(row.results.get(PROBE)), _top1(row.results.get(KNN)),
                 _top1(row.results.get(ZERO_SHOT)), _count(row.steps), _count(row.global_batch),
                 _duration(row.wall_s)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    for target in targets:
        verdict = {True: "met", False: "**not met**", None: "not measured"}[target.met]
        lines.append(f"- {verdict}: {target.text}: {target.detail}")
    lines += ["", "## How each row was made", ""]
    for row in rows:  # a baseline's is prose, a method's a command line
        how = row.command if row.kind == "baseline" else f"`{row.command}`"
        lines.append(f"- {row.label}: {how}")
    return "\n".join(lines) + "\n"


def write_table(path: Path, text: str) -> None:
    """``text`` to ``path``, renamed into place when complete (a reader never sees half)."""
    with atomic_file(Path(path), overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _top1(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"
