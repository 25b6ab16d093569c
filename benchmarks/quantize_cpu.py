"""CPU group quantizer at the op level against the machine's copy bandwidth (issue 10 goal).

Run: ``python benchmarks/quantize_cpu.py [--numel 16777216] [--bits 2] [--threads 1]
[--dtype float32]``. Prints the best of ``--repeats`` timings of ``out.copy_(x)``, ``quantize``
and ``dequantize`` (group size 256) for the native C path (:mod:`fewbit.codecs.native`), the
fused (compiled) and the eager PyTorch path, and
``copy time / (quantize + dequantize time)``, the fraction of copy bandwidth reached (goal:
>= 50% at 2 bits). The first native or fused call compiles (seconds; cached on disk
afterwards): it is timed separately. Run it alone on the machine: shared cores make every
figure noisy.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fewbit.codecs.quantize import dequantize, quantize

    x = torch.randn(args.numel // 4096, 4096).to(getattr(torch, args.dtype))
    out = torch.empty_like(x)
    copy = best_of(lambda: out.copy_(x), args.repeats)
    nbytes = 2 * x.numel() * x.element_size()
    print(f"copy: {copy * 1e3:.1f} ms ({nbytes / copy / 1e9:.2f} GB/s read+write, {args.dtype})")
    for name, compile_flag, native_flag in (
        ("native", "1", "1"),
        ("fused", "1", "0"),
        ("eager", "0", "0"),
    ):
        os.environ["FEWBIT_COMPILE"] = compile_flag
        os.environ["FEWBIT_NATIVE"] = native_flag
        start = time.perf_counter()
        q = quantize(x, args.bits)
        dequantize(q)
        first = time.perf_counter() - start
        tq = best_of(lambda: quantize(x, args.bits), args.repeats)
        td = best_of(lambda q=q: dequantize(q), args.repeats)
        print(
            f"{name}: first call {first:.1f} s; quantize {tq * 1e3:.1f} ms, dequantize "
            f"{td * 1e3:.1f} ms; copy/(q+d) = {copy / (tq + td):.0%} of copy bandwidth"
        )


if __name__ == "__main__":
    main()
