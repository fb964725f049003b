"""Benchmark the contrastive loss backends: time and extra memory of forward + backward.

    python -m megabatch.kernels.benchmark                       # CPU: fp32, D=256, N in 4096..65536
    python -m megabatch.kernels.benchmark --device cuda         # GPU: bf16, D=512, + N=1,048,576 (triton)

Prints a table and rewrites this device's section of docs/benchmarks.md (--output).
Columns: backend, loss, N, D, dtype, ms for one forward + backward, effective GFLOP/s
counting 8 N^2 D (kernels.contrastive.logits_flops), extra peak memory. "Extra" is the
larger of two peaks above what was allocated before the call (the features): the
forward's, and the backward's less the returned gradients (2 N D elements, the same for
every backend). That is the scratch memory the loss itself needs, including what the
forward frees before the gradients exist (the Triton forward's per-program column
partials, programs x N fp32), which one peak less the gradients would hide.

CPU memory is the process's resident-set high-water mark (VmHWM), reset before the
forward and again before the backward (/proc/self/clear_refs) after freed heap memory is
handed back (malloc_trim), so that memory freed before the call (the features'
temporaries, the warm-up's tiles) neither hides nor is mistaken for the loss's scratch;
each case runs in a fresh subprocess. GPU memory is torch.cuda.max_memory_allocated. A case
whose estimated need exceeds the free memory is reported as skipped, not run: the
reference needs about 21 bytes per logit (fp32 logits, two log-softmaxes and their
gradients; NT-Xent about 25 over its 2N x 2N, the margin loss about 32: distances, hinges
and their gradients).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megabatch.kernels.contrastive import clip_loss, logits_flops, ntxent_loss
from megabatch.kernels.margin import margin_contrastive_loss
from megabatch.kernels.siglip import siglip_loss

LOSSES = {"clip": (clip_loss, 1 / 0.07), "ntxent": (ntxent_loss, 0.1)}
# The margin loss's m: unit rows put negatives at about sqrt(2), most inside 1.5. It is a
# float hyperparameter (no gradient), hence called with a float, no d/dm asked.
LOSSES["margin"] = (margin_contrastive_loss, 1.5)
FLOAT_HYPERPARAMETER_LOSSES = {"margin"}
# SigLIP learns two scalars, t and b: its initial values (t = exp(log 10), b = -10).
LOSSES["siglip"] = (siglip_loss, (10.0, -10.0))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE_BYTES_PER_LOGIT = 21
# Per loss where it differs, from the peaks docs/benchmarks.md measured at N = 4,096:
# NT-Xent's masks over its 2N x 2N logits, the margin loss's distances and hinges.
REFERENCE_BYTES_PER_LOGIT_OF = {"ntxent": 25, "margin": 32}
FOOTNOTE = (
    "N is the number of pairs; the rate counts 8 N² D for both losses, so for NT-Xent, "
    "whose S is 2N x 2N, the arithmetic done is four times what the rate column credits. "
    "'x reference' is the reference's time over this row's; extra peak memory excludes "
    "the features and the returned gradients. NT-Xent's z1 and z2 are the two halves of "
    "one (2N, D) tensor, as the trainer lays them out: two separate tensors would cost "
    "one 2N x D copy more."
)


def _features(n: int, d: int, dtype: torch.dtype, device: str):
    """(a, b), (n, d) each, rows unit-norm, partners correlated: the two halves of one
    (2n, d) tensor (the trainer's layout, which NT-Xent stacks without a copy)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = F.normalize(torch.randn(n, d, device=device, generator=g), dim=1)
    b = F.normalize(a + torch.randn(n, d, device=device, generator=g), dim=1)
    both = torch.cat([a, b]).to(dtype)
    del a, b
    return both[:n].requires_grad_(), both[n:].requires_grad_()


def _forward(loss_name: str, backend: str, a, b):
    fn, s = LOSSES[loss_name]
    if loss_name in FLOAT_HYPERPARAMETER_LOSSES:
        return fn(a, b, s, backend=backend), (a, b)
    if isinstance(s, tuple):  # several learnt scalars, each given a gradient
        scalars = tuple(torch.tensor(v, device=a.device, requires_grad=True) for v in s)
        return fn(a, b, *scalars, backend=backend), (a, b, *scalars)
    scale = torch.tensor(s, device=a.device, requires_grad=True)
    return fn(a, b, scale, backend=backend), (a, b, scale)


def _backward(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _fwd_bwd(loss_name: str, backend: str, a, b):
    return _backward(*_forward(loss_name, backend, a, b))


def _output_bytes(grads) -> int:
    return sum(g.numel() * g.element_size() for g in grads)


def _free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024


def _needs_too_much(backend: str, loss: str, n: int, device: str) -> str | None:
    if backend != "reference":
        return None
    rows = 2 * n if loss == "ntxent" else n
    need = REFERENCE_BYTES_PER_LOGIT_OF.get(loss, REFERENCE_BYTES_PER_LOGIT) * rows * rows
    if need > 0.8 * _free_bytes(device):
        return f"skipped: needs ~{need / 2**30:.0f} GiB"
    return None


def _measure_cpu(loss: str, backend: str, n: int, d: int, dtype: str) -> dict:
    """Runs in a fresh process: peak RSS is a high-water mark per process."""
    a, b = _features(n, d, DTYPES[dtype], "cpu")
    small_a, small_b = _features(256, d, DTYPES[dtype], "cpu")
    _fwd_bwd(loss, backend, small_a, small_b)  # thread pools, allocator: warm
    _reset_peak_rss()
    before = _peak_rss()  # just reset: what is resident now
    t0 = time.perf_counter()
    value, inputs = _forward(loss, backend, a, b)
    forward_peak = _peak_rss()
    _reset_peak_rss()  # the forward's saved tensors stay resident, and count below
    grads = _backward(value, inputs)
    seconds = time.perf_counter() - t0
    backward_peak = _peak_rss()
    extra = max(forward_peak - before, backward_peak - before - _output_bytes(grads))
    return {"ms": seconds * 1e3, "extra_bytes": max(extra, 0)}


def _reset_peak_rss() -> None:
    # Hand freed heap memory back first (glibc's malloc_trim): pages freed but kept
    # resident would otherwise be reused without raising the peak, hiding scratch.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then read low
        pass
    # "5" resets this process's VmHWM to its current RSS (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        raise SystemExit(f"cannot reset the peak RSS (/proc/self/clear_refs): {exc}") from exc


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _measure_cuda(loss: str, backend: str, n: int, d: int, dtype: str, repeat: int) -> dict:
    a, b = _features(n, d, DTYPES[dtype], "cuda")
    if repeat > 1:  # compile and autotune outside the timing (huge N reuses smaller N's)
        _fwd_bwd(loss, backend, a, b)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        # The allocator's peaks are host-side counters: reading them between the passes
        # adds no synchronisation to the timed region.
        loss_value, inputs = _forward(loss, backend, a, b)
        forward_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = _backward(loss_value, inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        backward_peak = torch.cuda.max_memory_allocated() - _output_bytes(grads)
        extra = max(forward_peak, backward_peak) - before
        del grads, loss_value
    return {"ms": statistics.median(times), "extra_bytes": max(extra, 0)}


def _run_case(args, loss: str, backend: str, n: int) -> dict:
    row = {"backend": backend, "loss": loss, "n": n, "d": args.dim, "dtype": args.dtype}
    skip = _needs_too_much(backend, loss, n, args.device)
    if skip:
        return {**row, "note": skip}
    if args.device == "cuda":
        try:
            repeat = 1 if n > 200_000 else args.repeat
            return {**row, **_measure_cuda(loss, backend, n, args.dim, args.dtype, repeat)}
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {**row, "note": "out of memory"}
    # CPU: one subprocess per case so that peak RSS belongs to this case alone.
    code = (
        "import json, sys; from megabatch.kernels.benchmark import _measure_cpu; "
        f"print(json.dumps(_measure_cpu({loss!r}, {backend!r}, {n}, {args.dim}, {args.dtype!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode < 0:  # killed by a signal: on Linux, SIGKILL is the OOM killer
        return {**row, "note": f"killed by signal {-proc.returncode} (out of memory?)"}
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return {**row, "note": f"failed: {reason[:80]}"}
    return {**row, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _table(rows: list[dict], flops_unit: str) -> str:
    div = 1e12 if flops_unit == "TFLOP/s" else 1e9
    header = (
        f"| backend | loss | N | D | dtype | ms fwd+bwd | {flops_unit} (8N²D) "
        "| x reference | extra peak memory |"
    )
    lines = [header, "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    ref_ms = {
        (r["loss"], r["n"]): r["ms"] for r in rows if r["backend"] == "reference" and "ms" in r
    }
    for r in rows:
        if "ms" not in r:
            cells = [r["note"], "", "", ""]
        else:
            rate = logits_flops(r["n"], r["d"]) / (r["ms"] / 1e3) / div
            ref = ref_ms.get((r["loss"], r["n"]))
            speedup = f"{ref / r['ms']:.2f}x" if ref else "-"
            cells = [f"{r['ms']:.1f}", f"{rate:.1f}", speedup, _format_bytes(r["extra_bytes"])]
        lines.append(
            f"| {r['backend']} | {r['loss']} | {r['n']:,} | {r['d']} | {r['dtype']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def _write_section(path: Path, device: str, body: str) -> None:
    """Replace this device kind's section ("## CPU" or "## GPU") and keep the other."""
    title = "## GPU" if device == "cuda" else "## CPU"
    text = (
        path.read_text()
        if path.exists()
        else "# Kernel benchmarks\n\nWritten by `python -m megabatch.kernels.benchmark`; each device kind keeps its own section.\n"
    )
    sections = re.split(r"(?m)^(?=## )", text)
    head, rest = sections[0], [s for s in sections[1:] if not s.startswith(title)]
    rest.append(f"{title}\n\n{body}\n\n")
    rest.sort()  # CPU before GPU
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(head.rstrip() + "\n\n" + "".join(rest).rstrip() + "\n")
    tmp.replace(path)  # never a half-written file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megabatch.kernels.benchmark",
        description="Time and memory of the contrastive loss backends (forward + backward).",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default="4096,16384,65536", help="comma-separated N")
    parser.add_argument("--dim", type=int, default=None, help="D (default 256 CPU, 512 GPU)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default fp32 CPU, bf16 GPU")
    parser.add_argument("--backends", default=None, help="default reference,torch (+triton on GPU)")
    parser.add_argument("--losses", default="clip", help="comma-separated: clip,ntxent")
    parser.add_argument(
        "--huge",
        type=int,
        default=None,
        help="one more CLIP N, fused backend only (GPU default 1048576)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per GPU case (median)")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    args.dim = args.dim or (512 if gpu else 256)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    backends = (args.backends or ("reference,torch,triton" if gpu else "reference,torch")).split(
        ","
    )
    if args.huge is None and gpu:
        args.huge = 1 << 20
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = []
    for loss in args.losses.split(","):
        cases = [(backend, n) for n in sizes for backend in backends]
        if args.huge and loss == "clip":  # NT-Xent's would be 2 * huge views
            cases.append(("triton" if gpu else "torch", args.huge))
        for backend, n in cases:
            row = _run_case(args, loss, backend, n)
            rows.append(row)
            shown = f"{row['ms']:.1f} ms" if "ms" in row else row["note"]
            print(f"  {backend:9s} {loss:6s} N={n:>9,}: {shown}", file=sys.stderr, flush=True)

    unit = "TFLOP/s" if gpu else "GFLOP/s"
    table = _table(rows, unit)
    print(table)
    command = "python -m megabatch.kernels.benchmark " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    body = (
        f"{dt.date.today().isoformat()}, {_device_name(args.device)}, torch {torch.__version__}"
        + (f", triton {_triton_version()}" if gpu else "")
        + f". Command: `{command.strip()}`.\n\n{table}\n\n{FOOTNOTE}"
    )
    _write_section(args.output, args.device, body)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
