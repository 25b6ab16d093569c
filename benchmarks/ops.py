"""Op-level benchmark of fewbit's per-step codecs against torch (issue 10's op goals).

Rows (16M elements by default, float32 and bfloat16; CPU unless ``--device cuda``):

* ``gelu3 fwd+bwd``: ``fewbit.functional.gelu(x, bits=3)`` forward and backward through
  autograd, against ``torch.nn.functional.gelu``'s. Goal: <= 1.3x torch's time.
* ``quantize+dequantize b2``: ``fewbit.codecs.quantize.quantize(x, 2)`` then ``dequantize``;
  its effective bandwidth (bytes read + written by both passes: x, the 2-bit codes and the
  per-group lo/scale, twice) against a measured copy (``dst.copy_(src)`` of 256 MiB: bytes
  read + written). Goal: >= 50% of copy. Next to it, without a goal, torch's own ``clone``
  (a copy into a fresh tensor) on the same scale: what a fresh output costs on this machine.
* ``transient gelu3 fwd``: peak bytes allocated while ``fewbit.functional.gelu`` runs forward
  (with grad) minus what autograd keeps saved for backward when it returns (the stored 3-bit
  code: the memory the op exists to keep, 0.375 bytes per element), against torch's GELU
  forward peak (its output; torch saves the input, which already exists), in float32,
  float16 and bfloat16. Goal: <= torch's + 10% (no temporaries beyond the output). The
  stored code is shown next to it. CPU: ``torch.profiler`` allocation events
  (`fewbit.profile.peak.cpu_profiler_memory`); CUDA: ``max_memory_allocated``.

Times are medians of ``--reps`` runs after one warm-up (wall clock on the CPU, CUDA events on a
GPU). The machine and thread count are printed; benchmark alone (other jobs on the same cores
change CPU figures by 10-15% and more). Only public fewbit functions are called.

Run: ``python benchmarks/ops.py [--n 16777216] [--reps 5] [--device cpu] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GOALS = {"gelu3": 1.3, "quant": 0.5, "transient": 1.10}


@dataclass
class Row:
    """One measurement: what, dtype, fewbit's figure, the reference's, their ratio, the goal."""

    op: str
    dtype: str
    fewbit: float
    reference: float
    unit: str
    ratio: float
    goal: str
    meets: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before."""
    return memory_bytes(fn, device)[0]


def memory_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """(peak, held): bytes allocated by ``fn()`` above what was allocated before, at the peak
    and after it returned with its result alive (the result and what autograd saved)."""
    from fewbit.profile.peak import cpu_profiler_memory

    if device.type != "cuda":
        return cpu_profiler_memory(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    held = torch.cuda.memory_allocated(device) - base
    del result
    return peak, held


def copy_gbs(device: torch.device, reps: int, nbytes: int = 256 << 20) -> float:
    """Copy bandwidth: (bytes read + bytes written) / median time, in GB/s."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_s(lambda: dst.copy_(src), device, reps) / 1e9


def gelu_row(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> Row:
    """3-bit GELU forward+backward against torch's GELU forward+backward."""
    import fewbit.functional as FB

    x = torch.randn(n, device=device).to(dtype).requires_grad_(True)
    g = torch.randn(n, device=device).to(dtype)
    ours = median_s(lambda: torch.autograd.grad(FB.gelu(x, bits=3), x, g), device, reps)
    ref = median_s(lambda: torch.autograd.grad(F.gelu(x), x, g), device, reps)
    ratio = ours / ref
    return Row("gelu3 fwd+bwd", _name(dtype), ours * 1e3, ref * 1e3, "ms", ratio,
               f"<= {GOALS['gelu3']}x", ratio <= GOALS["gelu3"])  # fmt: skip


def quant_row(n: int, dtype: torch.dtype, device: torch.device, reps: int, copy: float) -> Row:
    """2-bit quantize + dequantize (group 256) as a fraction of the copy bandwidth."""
    from fewbit.codecs.quantize import dequantize, quantize

    x = torch.randn(n // 4096, 4096, device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)

    def both() -> torch.Tensor:
        return dequantize(quantize(x, 2, 256, generator=gen))

    seconds = median_s(both, device, reps)
    per_elem = x.element_size() + 2 / 8 + 4 / 256  # x, codes, lo+scale per 256 elements
    gbs = 2 * per_elem * x.numel() / seconds / 1e9
    ratio = gbs / copy
    return Row("quantize+dequantize b2", _name(dtype), gbs, copy, "GB/s", ratio,
               f">= {GOALS['quant']:.0%} of copy", ratio >= GOALS["quant"])  # fmt: skip


def clone_row(n: int, dtype: torch.dtype, device: torch.device, reps: int, copy: float) -> Row:
    """Reference, no goal: torch's ``x.clone()`` (a copy into a fresh tensor, as dequantize
    must return) as a fraction of the copy bandwidth. On the CPU a fresh buffer this large
    is a new mapping whose first write faults in every page: the cost every op with a fresh
    output pays, which the preallocated copy does not."""
    x = torch.randn(n // 4096, 4096, device=device).to(dtype)
    gbs = 2 * x.element_size() * x.numel() / median_s(x.clone, device, reps) / 1e9
    return Row("torch clone (reference)", _name(dtype), gbs, copy, "GB/s", gbs / copy,
               "no goal: a fresh output's cost", True)  # fmt: skip


def transient_row(n: int, dtype: torch.dtype, device: torch.device) -> Row:
    """Peak of a few-bit GELU forward (with grad) less what it keeps saved for backward,
    against torch's GELU forward peak."""
    import fewbit.functional as FB

    x = torch.randn(n, device=device).to(dtype).requires_grad_(True)
    out_bytes = n * x.element_size()
    peak, held = memory_bytes(lambda: FB.gelu(x, bits=3), device)
    saved = held - out_bytes  # the stored code (and non-finite side store)
    ref = peak_bytes(lambda: F.gelu(x), device)
    ours = peak - saved
    ratio = ours / max(ref, 1)
    return Row("transient gelu3 fwd", _name(dtype), ours / 2**20, ref / 2**20, "MiB", ratio,
               f"<= {GOALS['transient']}x (+ {saved / 2**20:.2f} MiB saved code)",
               ratio <= GOALS["transient"])  # fmt: skip


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def format_table(rows: Sequence[Row], header: str) -> str:
    lines = [header, f"{'op':24} {'dtype':9} {'fewbit':>10} {'torch/copy':>11} {'unit':5} "
             f"{'ratio':>6}  goal"]  # fmt: skip
    for r in rows:
        lines.append(f"{r.op:24} {r.dtype:9} {r.fewbit:10.2f} {r.reference:11.2f} {r.unit:5} "
                     f"{r.ratio:6.2f}  {r.goal} {'ok' if r.meets else 'MISSED'}")  # fmt: skip
    return "\n".join(lines)


def run(n: int, reps: int, device: str) -> tuple[list[Row], str]:
    """All rows at ``n`` elements on ``device``; (rows, header line)."""
    if n < 4096 or n % 4096:
        raise ValueError(f"n must be a positive multiple of 4096, got {n}")
    dev = torch.device(device)
    copy = copy_gbs(dev, reps)
    header = (f"{platform.node() or 'machine'}: {device}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, n={n}, median of {reps}; copy {copy:.1f} GB/s")
    rows: list[Row] = []
    for dtype in (torch.float32, torch.bfloat16):
        rows.append(gelu_row(n, dtype, dev, reps))
    for dtype in (torch.float32, torch.bfloat16):
        rows.append(quant_row(n, dtype, dev, reps, copy))
        rows.append(clone_row(n, dtype, dev, reps, copy))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rows.append(transient_row(n, dtype, dev))
    return rows, header


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 24, help="elements (default 16M)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per figure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        rows, header = run(args.n, args.reps, args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
