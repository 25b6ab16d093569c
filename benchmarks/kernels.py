"""GPU benchmark of the fused few-bit Triton kernels against PyTorch's own ops.

For every kernel, size (1M..256M elements, powers of 4) and dtype (float32, bfloat16) it
times forward and backward with CUDA events (``triton.testing.do_bench``, median after
warm-up), converts the time to bandwidth with the byte counts below and compares it with a
measured device-to-device copy (bytes read + written) and with PyTorch's op.

Run: ``python benchmarks/kernels.py [--sizes 20 22 24] [--dtypes float32 bfloat16]
[--json out.json]``, or call :func:`run`. Without a CUDA GPU it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_SIZES = tuple(1 << e for e in range(20, 29, 2))  # 1M, 4M, 16M, 64M, 256M
DEFAULT_DTYPES = ("float32", "bfloat16")
KERNELS = ("gelu", "silu", "relu", "pack", "unpack", "quantize")
QUANT_BITS = 2
GROUP_SIZE = 256


@dataclass(frozen=True)
class Bytes:
    """Bytes per element moved by one forward and one backward pass."""

    forward: float
    backward: float

    @property
    def both(self) -> float:
        return self.forward + self.backward


def fewbit_bytes(kernel: str, itemsize: int, bits: int) -> Bytes:
    """Traffic of the fused kernels. Activations: forward reads x, writes y and the code;
    backward reads grad and the code, writes grad. pack: codes (1 B) in, bits/8 out;
    unpack the reverse (reported as forward = pack, backward = unpack); quantize: forward =
    quantize, backward = dequantize, at QUANT_BITS bits and GROUP_SIZE."""
    code = bits / 8
    if kernel == "quantize":  # x in, codes + 4 B per group out; dequantize the reverse
        return Bytes(itemsize + code + 4 / GROUP_SIZE, code + 4 / GROUP_SIZE + itemsize)
    if kernel in ("pack", "unpack"):
        return Bytes(1 + code, code + 1)
    return Bytes(2 * itemsize + code, 2 * itemsize + code)


def torch_bytes(kernel: str, itemsize: int) -> Bytes:
    """Traffic of PyTorch's op: forward reads x, writes y; backward reads grad and the saved
    tensor (x, or y for relu), writes grad. pack/unpack/quantize: not counted (the torch
    codecs make temporaries); only their times are compared."""
    if kernel in ("pack", "unpack", "quantize"):
        return Bytes(1.0, 1.0)  # not compared: the torch packer makes int64 temporaries
    return Bytes(2 * itemsize, 3 * itemsize)


def bandwidth_gbs(nbytes: float, ms: float) -> float:
    """GB/s (1e9 bytes per second) for ``nbytes`` moved in ``ms`` milliseconds."""
    return nbytes / (ms * 1e-3) / 1e9


@dataclass
class Row:
    kernel: str
    dtype: str
    n: int
    bits: int
    fewbit_fwd_ms: float
    fewbit_bwd_ms: float
    torch_fwd_ms: float
    torch_bwd_ms: float
    fwd_gbs: float
    bwd_gbs: float
    fwd_of_copy: float
    bwd_of_copy: float
    both_of_copy: float
    ratio_fwd: float
    ratio_bwd: float
    ratio_both: float


def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of ``nbytes``: (read + written bytes) / median time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return bandwidth_gbs(2 * nbytes, ms)


def _torch_ops(kernel: str, x: torch.Tensor, g: torch.Tensor) -> tuple[Callable, Callable]:
    aten = torch.ops.aten
    if kernel == "gelu":
        return (lambda: F.gelu(x)), (lambda: aten.gelu_backward(g, x))
    if kernel == "silu":
        return (lambda: F.silu(x)), (lambda: aten.silu_backward(g, x))
    y = F.relu(x)
    return (lambda: F.relu(x)), (lambda: aten.threshold_backward(g, y, 0))


def bench_one(kernel: str, dtype: torch.dtype, n: int, bits: int, copy_gbs: float) -> Row:
    """Time one kernel at one size and dtype."""
    from fewbit import kernels as fk

    x = torch.randn(n, device="cuda").to(dtype)
    g = torch.randn(n, device="cuda").to(dtype)
    itemsize = x.element_size()
    if kernel == "quantize":
        import importlib

        from fewbit.kernels import quantize as kq

        codec = importlib.import_module("fewbit.codecs.quantize")
        bits = QUANT_BITS
        xq = x.reshape(-1, GROUP_SIZE * 16)
        q = kq.quantize(xq, bits, GROUP_SIZE, seed=0)
        fwd = lambda: kq.quantize(xq, bits, GROUP_SIZE, seed=0)  # noqa: E731
        bwd = lambda: kq.dequantize(q)  # noqa: E731
        t_fwd = lambda: codec.quantize(xq, bits, GROUP_SIZE)  # noqa: E731
        t_bwd = lambda: codec.dequantize(q)  # noqa: E731
    elif kernel in ("pack", "unpack"):
        codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, device="cuda")
        packed = fk.pack(codes, bits)
        fwd, bwd = (lambda: fk.pack(codes, bits)), (lambda: fk.unpack(packed, bits, n))
        from fewbit.codecs import bitpack

        t_fwd, t_bwd = (
            (lambda: bitpack.pack(codes, bits)),
            (lambda: bitpack.unpack(packed, bits, n)),
        )
    else:
        b = 1 if kernel == "relu" else bits
        grid = torch.linspace(-4, 4, (1 << b) + 1, dtype=torch.float64, device="cuda")
        bounds = None if kernel == "relu" else grid[1:-1]
        levels = torch.linspace(0, 1, 1 << b, device="cuda")
        _, packed = fk.activation_forward(x, kernel, None, bounds, False, b)
        fwd = lambda: fk.activation_forward(x, kernel, None, bounds, False, b)  # noqa: E731
        bwd = lambda: fk.activation_backward(g, packed, levels, b)  # noqa: E731
        t_fwd, t_bwd = _torch_ops(kernel, x, g)
        bits = b
    ours = fewbit_bytes(kernel, itemsize, bits)
    f_ms, b_ms, tf_ms, tb_ms = (_bench(f) for f in (fwd, bwd, t_fwd, t_bwd))
    fwd_gbs = bandwidth_gbs(ours.forward * n, f_ms)
    bwd_gbs = bandwidth_gbs(ours.backward * n, b_ms)
    both_gbs = bandwidth_gbs(ours.both * n, f_ms + b_ms)
    return Row(
        kernel, str(dtype).replace("torch.", ""), n, bits, f_ms, b_ms, tf_ms, tb_ms,
        fwd_gbs, bwd_gbs, fwd_gbs / copy_gbs, bwd_gbs / copy_gbs, both_gbs / copy_gbs,
        f_ms / tf_ms, b_ms / tb_ms, (f_ms + b_ms) / (tf_ms + tb_ms),
    )  # fmt: skip


def format_table(rows: Sequence[Row], copy_gbs: float) -> str:
    """Plain-text table; ratios < 1 mean faster than PyTorch."""
    head = (
        f"copy bandwidth (read+write): {copy_gbs:.0f} GB/s\n"
        f"{'kernel':8} {'dtype':9} {'n':>10} {'b':>2} {'fwd ms':>8} {'bwd ms':>8} "
        f"{'fwd %cp':>7} {'bwd %cp':>7} {'x torch fwd':>11} {'bwd':>6} {'both':>6}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r.kernel:8} {r.dtype:9} {r.n:>10} {r.bits:>2} {r.fewbit_fwd_ms:8.3f} "
            f"{r.fewbit_bwd_ms:8.3f} {100 * r.fwd_of_copy:6.1f}% {100 * r.bwd_of_copy:6.1f}% "
            f"{r.ratio_fwd:11.2f} {r.ratio_bwd:6.2f} {r.ratio_both:6.2f}"
        )
    return "\n".join(lines)


def run(
    sizes: Sequence[int] = DEFAULT_SIZES,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    kernels: Sequence[str] = KERNELS,
    bits: int = 3,
    json_path: str | None = None,
) -> list[Row]:
    """Benchmark on the current CUDA device; prints a table, optionally writes JSON."""
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/kernels.py needs a CUDA GPU (none is visible)")
    from fewbit import kernels as fk

    if not fk.has_triton():
        raise RuntimeError("benchmarks/kernels.py needs the triton package")
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for kernel in kernels:
        for name in dtypes:
            for n in sizes:
                rows.append(bench_one(kernel, getattr(torch, name), n, bits, copy_gbs))
                torch.cuda.empty_cache()
    print(format_table(rows, copy_gbs))
    if json_path:
        payload = {
            "device": torch.cuda.get_device_name(),
            "copy_gbs": copy_gbs,
            "rows": [asdict(r) for r in rows],
        }
        with open(json_path, "w") as fh:
            json.dump(payload, fh, indent=2)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", help="log2 of the element counts")
    parser.add_argument("--dtypes", nargs="*", default=list(DEFAULT_DTYPES))
    parser.add_argument("--kernels", nargs="*", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--json", default="kernels_bench.json")
    args = parser.parse_args(argv)
    sizes = [1 << e for e in args.sizes] if args.sizes else list(DEFAULT_SIZES)
    try:
        run(sizes, args.dtypes, args.kernels, args.bits, args.json)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
