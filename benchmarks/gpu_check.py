"""GPU validation of fewbit: correctness of the kernel path, sync-freedom, CUDA graphs, speed and
a RoBERTa-base step, in one command (under 5 minutes on one H100/H200).

    python benchmarks/gpu_check.py                    # everything, on the current CUDA device
    python benchmarks/gpu_check.py --skip-big --skip-roberta
    python benchmarks/gpu_check.py --cpu-dry-run      # correctness rows on the CPU (interpreter)

Sections (each row PASS, FAIL, SKIP or info; one table at the end):

* check: the Triton path (``fewbit.kernels.force_kernels(True)``) against the PyTorch path
  (``force_kernels(False)``) and torch's own ops: few-bit activations (continuous and mask)
  in float32, float16 and bfloat16 at sizes 1, odd and large, misaligned and non-contiguous
  inputs, NaN/inf inputs and NaN gradients; bit packing; the group quantizer (same lo/scale,
  same dequantization, error below one step, NaN groups); the sketch against S^T X.
* big: a 2**31 + 17-element float16 tensor through a 3-bit GELU (forward + backward) and the
  2-bit quantizer (32-bit index overflow, packed bytes past 2**31).
* sync: ``torch.cuda.set_sync_debug_mode("error")`` around training steps of a small model
  with few-bit activations, randomized linear layers and level L2 (after warm-up).
* graph: ``torch.cuda.graph`` capture of a few-bit GELU forward + backward; replay equals eager.
* speed (info): CUDA events at 64M and 256M elements: 3-bit GELU kernels and the autograd op
  against torch's GELU, 2-bit quantize + dequantize, against a device copy's bandwidth.
* roberta: roberta-base (config only, no download) at ``--batch`` x 128: vanilla, gelu3,
  gelu3+rand20, L2 and ckpt (``fewbit.bench`` configurations); ms/step and
  ``torch.cuda.max_memory_allocated``; FAIL on a non-finite loss or gradient.

Exit status: 0 when every correctness row passed, 1 on any FAIL, 2 when it cannot run (no
CUDA GPU, or TRITON_INTERPRET / FEWBIT_DISABLE_TRITON set for a GPU run). ``--cpu-dry-run``
sets ``TRITON_INTERPRET=1`` itself (before triton is imported), uses toy sizes, and runs the
check, big and roberta sections on the CPU with the kernel dispatch forced: it tests this
script and the dispatch, not the GPU.
"""

from __future__ import annotations

import os
import sys

if "--cpu-dry-run" in sys.argv[1:]:  # must precede any import of triton
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Iterator, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@dataclass
class Ctx:
    """Where and how big: the device, toy sizes for the dry run, the time budget."""

    dev: str = "cuda"
    small: bool = False
    budget_s: float = 290.0
    t0: float = 0.0

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def sync(self) -> None:
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def empty(self) -> None:
        if self.dev == "cuda":
            torch.cuda.empty_cache()


ROWS: list[tuple[str, str, str, str]] = []  # section, check, status, detail
T0 = time.time()


def record(section: str, check: str, status: str, detail: str = "") -> None:
    ROWS.append((section, check, status, detail))
    print(f"[{time.time() - T0:6.1f}s] {status:5} {section:7} {check:42} {detail}", flush=True)


def run_check(ctx: Ctx, section: str, check: str, fn: Callable[[], tuple[bool, str]]) -> None:
    """Record fn()'s (ok, detail); an exception is a FAIL with the fewbit line it came from."""
    try:
        ok, detail = fn()
        record(section, check, "PASS" if ok else "FAIL", detail)
    except torch.cuda.OutOfMemoryError as err:
        ctx.empty()
        record(section, check, "SKIP", f"out of memory: {str(err)[:80]}")
    except Exception as err:  # noqa: BLE001 - a failing check must not stop the others
        tb = traceback.format_exc().strip().splitlines()
        where = next((ln.strip() for ln in reversed(tb) if "fewbit/" in ln and "File" in ln), "")
        record(section, check, "FAIL", f"{type(err).__name__}: {str(err)[:160]} {where[-90:]}")


# --- paths ----------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_path(enabled: bool) -> Iterator[None]:
    """Force the Triton path (True) or the PyTorch path (False) of every fewbit op."""
    from fewbit.kernels import force_kernels

    with force_kernels(enabled):
        yield


@contextlib.contextmanager
def counting(module: Any, name: str, counter: dict[str, int]) -> Iterator[None]:
    """Count calls of ``module.name`` (a kernel entry point) inside the block."""
    original = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter[name] = counter.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


DIGITS = {torch.float32: (24, -126), torch.float16: (11, -14), torch.bfloat16: (8, -126)}


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |v| (float64), floored at the smallest normal's spacing."""
    digits, emin = DIGITS[dtype]
    _, e = torch.frexp(v.double().abs())
    one = torch.ones_like(v, dtype=torch.float64)
    return torch.ldexp(one, torch.clamp(e - 1, min=emin) - digits + 1)


def within_ulps(
    y: torch.Tensor, ref: torch.Tensor, k: float, x: Optional[torch.Tensor] = None
) -> tuple[bool, float]:
    """|y - ref| <= k (ulp(ref) + ulp(x)) where ref is finite (the ulp(x) term: where f(x)
    is tiny, as GELU far below 0, an error of the argument's own rounding size is allowed),
    identical NaN/inf elsewhere; returns (ok, worst error / tolerance)."""
    fin = torch.isfinite(ref)
    same = torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(
        torch.where(fin, 0.0, ref.double().nan_to_num(0.0)),
        torch.where(fin, 0.0, y.double().nan_to_num(0.0)),
    )
    err = (y.double() - ref.double()).abs()
    tol = k * ulp(ref, ref.dtype)
    if x is not None:
        tol = tol + k * ulp(x, ref.dtype)
    worst = float((err / tol)[fin].max()) if bool(fin.any()) else 0.0
    return same and worst <= 1.0, worst


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN equal to NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0),
                                                                       b.nan_to_num(0.0))


# --- 1. correctness -------------------------------------------------------------------------

ACTS = {  # fewbit.functional name -> torch reference
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
}
EXACT_FORWARD = {"relu", "leaky_relu"}  # mask activations: the kernel's y equals torch's


def _fewbit_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import fewbit.functional as FB

    return getattr(FB, name)


def _fwd_bwd(name: str, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.detach().requires_grad_(True)  # keeps x's layout: strided or misaligned views
    y = _fewbit_fn(name)(xr)
    (gx,) = torch.autograd.grad(y, xr, g)
    return y.detach(), gx


def _inputs(ctx: Ctx, dtype: torch.dtype, n: int, layout: str) -> torch.Tensor:
    base = (torch.randn(2 * n + 64, device=ctx.dev, dtype=torch.float64) * 3).to(dtype)
    if layout == "misaligned":  # data pointer off a 16-byte boundary
        return base[1 : n + 1]
    if layout == "strided":  # non-contiguous
        return base[: 2 * n].view(n, 2)[:, 0]
    return base[:n].clone()


def half_ulps(ctx: Ctx, dtype: torch.dtype) -> float:
    """Forward tolerance of a computed activation, in units of the output's ulp."""
    return 4.0 if dtype == torch.float32 else 1.0


def activation_case(ctx: Ctx, name: str, dtype: torch.dtype, n: int, layout: str = "plain"):
    """Kernel path against the PyTorch path (same gradient, bit for bit) and torch's forward
    (exact for masks; computed functions within 4 ulp in float32, 1 ulp in half types, of the
    output plus the input: `within_ulps`)."""
    from fewbit.kernels import activations

    x = _inputs(ctx, dtype, n, layout)
    g = torch.randn(x.shape, device=ctx.dev).to(dtype)
    calls: dict[str, int] = {}
    with kernel_path(True), counting(activations, "activation_forward", calls):
        y_k, g_k = _fwd_bwd(name, x, g)
    with kernel_path(False):
        y_t, g_t = _fwd_bwd(name, x, g)
    ref = ACTS[name](x)
    exact_t = torch.equal(y_t, ref)
    if name in EXACT_FORWARD:
        ok_y, worst = torch.equal(y_k, ref), 0.0
    else:
        ok_y, worst = within_ulps(y_k, ref, half_ulps(ctx, dtype), x)
    ok_g = same_values(g_k, g_t)
    used = calls.get("activation_forward", 0) > 0
    detail = (f"kernel calls {calls.get('activation_forward', 0)}, y {'ok' if ok_y else 'DIFF'} "
              f"(<= {worst:.2f} of tol), torch path y {'exact' if exact_t else 'DIFF'}, "
              f"grad kernel==torch path {'yes' if ok_g else 'NO'}")  # fmt: skip
    return ok_y and ok_g and exact_t and used, detail


def nonfinite_case(ctx: Ctx, name: str, dtype: torch.dtype):
    """NaN/+-inf inputs get torch's own forward and gradient there; NaN/inf gradients stay."""
    x = (torch.randn(4099, device=ctx.dev) * 3).to(dtype)
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[2000] = float("nan")
    g = torch.randn(4099, device=ctx.dev).to(dtype)
    g[10:13] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[10:13] = torch.tensor([-1.0, 1.0, -1.0])  # non-finite gradients where a mask is 0 and 1
    with kernel_path(True):
        y_k, g_k = _fwd_bwd(name, x, g)
    xr = x.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ACTS[name](xr), xr, g)
    ref = ACTS[name](x)
    special = torch.tensor([0, 1, 2, 10, 11, 12, 2000], device=ctx.dev)
    # torch's CPU GELU gives NaN at +-inf (CUDA: inf and NaN): the dry run compares the
    # forward at NaN and finite inputs only
    keep = torch.isfinite(x) | torch.isnan(x)
    if ctx.dev != "cpu":
        keep = torch.ones_like(keep)
    ok_y = torch.equal(torch.isnan(y_k[keep]), torch.isnan(ref[keep])) and torch.equal(
        torch.isinf(y_k[keep]), torch.isinf(ref[keep]))
    ok_g = same_values(g_k[special].float(), g_ref[special].float())
    values = lambda t: [float(v) for v in t]  # noqa: E731
    return ok_y and ok_g, (f"y[:3]={values(y_k[:3])} torch {values(ref[:3])}; grad at "
                           f"specials {values(g_k[special])} torch {values(g_ref[special])}")


def pack_case(ctx: Ctx, bits: int, n: int):
    from fewbit import kernels
    from fewbit.codecs import bitpack

    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, device=ctx.dev)
    with kernel_path(True):
        p = kernels.pack(codes, bits)
        u = kernels.unpack(p, bits, n)
    ok = torch.equal(p.cpu(), bitpack.pack(codes.cpu(), bits)) and torch.equal(u, codes)
    return ok, f"n={n}"


def quant_case(ctx: Ctx, bits: int, dtype: torch.dtype):
    """Kernel and PyTorch quantizers: identical lo/scale (deterministic), each dequantizer
    reproduces the other's encoding exactly, every element within one step of x, NaN groups
    dequantize to NaN."""
    from fewbit.codecs import quantize as cq

    x = (torch.randn(8, 3072, device=ctx.dev) * 3 + 1).to(dtype)
    x[1, 5] = float("nan")
    x[3, :256] = 0.25
    gen = lambda: torch.Generator(device=ctx.dev).manual_seed(3)  # noqa: E731
    with kernel_path(True):
        qk = cq.quantize(x, bits, 256, generator=gen())
        dk = cq.dequantize(qk)
    with kernel_path(False):
        qt = cq.quantize(x, bits, 256, generator=gen())
        dt = cq.dequantize(qt)
        dk_by_torch = cq.dequantize(qk)
    with kernel_path(True):
        dt_by_kernel = cq.dequantize(qt)
    bits16 = lambda t: t.view(torch.int16)  # noqa: E731
    ok_meta = torch.equal(bits16(qk.lo), bits16(qt.lo)) and torch.equal(bits16(qk.scale),
                                                                          bits16(qt.scale))
    ok_cross = same_values(dk, dk_by_torch) and same_values(dt, dt_by_kernel)
    scale = qk.scale.float().repeat_interleave(256).reshape(x.shape)
    good = torch.isfinite(scale)
    half_ulp = ulp(x.float(), dtype) if dtype != torch.float32 else 0.0
    err = (dk.float() - x.float()).abs()
    ok_err = bool((err <= scale + half_ulp)[good].all())
    ok_nan = bool(dk[1].isnan().any()) and bool(dt[1].isnan().any())
    return ok_meta and ok_cross and ok_err and ok_nan, (
        f"lo/scale {'=' if ok_meta else 'DIFF'}, cross-dequant {'=' if ok_cross else 'DIFF'}, "
        f"|err| <= step {ok_err}, NaN group {ok_nan}")


def sketch_case(ctx: Ctx, kind: str):
    """The sketch kernel against the explicit S^T X (S from projecting the identity)."""
    from fewbit import kernels

    n, d, k = (256, 96, 64) if ctx.small else (2048, 768, 512)
    seed = 2**40 + 12345
    with kernel_path(True):
        st = kernels.sketch_project(torch.eye(n, device=ctx.dev), k, seed, kind)
        x = torch.randn(n, d, device=ctx.dev)
        out = kernels.sketch_project(x, k, seed, kind)
        xs = torch.randn(d, n, device=ctx.dev).t()  # strided
        out_s = kernels.sketch_project(xs, k, seed, kind)
    eps = 2.0**-10 + n * 2.0**-24  # TF32 inputs, float32 accumulation
    worst = 0.0
    for inp, got in ((x, out), (xs, out_s)):
        ref = st.double() @ inp.double()
        bound = eps * (st.double().abs() @ inp.double().abs())
        worst = max(worst, float(((got.double() - ref).abs() / bound).max()))
    return worst <= 1.0, f"max error {worst:.2f} of the TF32 bound (contiguous and strided)"


def section_check(ctx: Ctx) -> None:
    sec = "check"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    sizes = (1, 4099) if ctx.small else (1, 4097, (1 << 20) + 3)  # odd: partial last byte
    for name in ACTS:
        for dt in dtypes:
            for n in sizes:
                run_check(ctx, sec, f"{name} {str(dt)[6:]} n={n}",
                          lambda name=name, dt=dt, n=n: activation_case(ctx, name, dt, n))
    for layout in ("misaligned", "strided"):
        for dt in (torch.float32, torch.bfloat16):
            run_check(ctx, sec, f"gelu {str(dt)[6:]} {layout}",
                      lambda dt=dt, layout=layout: activation_case(ctx, "gelu", dt, 4103, layout))
    for name in ("gelu", "silu", "relu"):
        for dt in dtypes:
            run_check(ctx, sec, f"{name} NaN/inf {str(dt)[6:]}",
                      lambda name=name, dt=dt: nonfinite_case(ctx, name, dt))
    for bits in (1, 3, 5, 8):
        run_check(ctx, sec, f"pack/unpack b{bits}",
                  lambda b=bits: pack_case(ctx, b, (4096 if ctx.small else 1 << 20) + 5))
    for bits, dt in ((2, torch.bfloat16), (2, torch.float32), (4, torch.float16),
                     (8, torch.bfloat16)):
        run_check(ctx, sec, f"quantize b{bits} {str(dt)[6:]}",
                  lambda b=bits, dt=dt: quant_case(ctx, b, dt))
    for kind in ("gaussian", "rademacher"):
        run_check(ctx, sec, f"sketch {kind} vs S^T X", lambda kind=kind: sketch_case(ctx, kind))


# --- 2. past 2**31 elements -----------------------------------------------------------------


def section_big(ctx: Ctx) -> None:
    sec = "big"
    n = 50003 if ctx.small else (1 << 31) + 17
    if ctx.dev == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < 24 * 2**30:
            record(sec, "n=2**31+17", "SKIP", f"{free / 2**30:.0f} GiB free, need ~24")
            return
    chunk = 4096 * 3 if ctx.small else 1 << 26  # a multiple of 8: whole packed bytes

    def gelu_big():
        x = torch.randn(n, device=ctx.dev, dtype=torch.float16)
        g = torch.randn(n, device=ctx.dev, dtype=torch.float16)
        with kernel_path(True):
            y, gx = _fwd_bwd("gelu", x, g)
        worst, bad_grad = 0.0, 0
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            ok, w = within_ulps(y[s:e], F.gelu(x[s:e]), half_ulps(ctx, torch.float16), x[s:e])
            worst = max(worst, w)
            with kernel_path(False):  # codes are per element: a chunk's gradient is the same
                _, g_ref = _fwd_bwd("gelu", x[s:e], g[s:e])
            bad_grad += int((~((gx[s:e] == g_ref) | (gx[s:e].isnan() & g_ref.isnan()))).sum())
        del x, g, y, gx
        ctx.empty()
        ok = worst <= 1.0 and bad_grad == 0
        return ok, f"y <= {worst:.2f} of tol, grads differing {bad_grad}"

    def quant_big():
        from fewbit.codecs import quantize as cq

        x = torch.randn(n, device=ctx.dev, dtype=torch.float16)
        with kernel_path(True):
            q = cq.quantize(x, 2, 256, per_sample=False)
            d = cq.dequantize(q)
        bad = 0
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            sc = q.scale[s // 256 : (e + 255) // 256].float().repeat_interleave(256)[: e - s]
            tol = sc + ulp(x[s:e].float(), torch.float16)  # one step + the fp16 rounding
            bad += int(((d[s:e].float() - x[s:e].float()).abs() > tol).sum())
        del x, q, d
        ctx.empty()
        return bad == 0, f"elements off by more than one step: {bad}"

    run_check(ctx, sec, f"gelu b3 fp16 n={n} fwd+bwd", gelu_big)
    run_check(ctx, sec, f"quantize b2 fp16 n={n}", quant_big)


# --- 3. host syncs --------------------------------------------------------------------------


def _small_model(kind: str, dev: str) -> torch.nn.Module:
    """Linear-GELU-Linear-LayerNorm converted as the bench row ``kind`` says."""
    from fewbit.bench.configs import get_config

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                     torch.nn.Linear(1024, 256), torch.nn.LayerNorm(256)]
    return get_config(kind).apply(torch.nn.Sequential(*layers)).to(dev)


def section_sync(ctx: Ctx) -> None:
    """Warm-up steps first (tables are cached per device), then set_sync_debug_mode('error')
    around further steps: any host-device synchronisation raises."""
    sec = "sync"
    for kind in ("vanilla", "gelu3", "gelu3+rand20", "L2"):
        def case(kind=kind):
            model = _small_model(kind, ctx.dev)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            x = torch.randn(512, 256, device=ctx.dev)

            def step():
                loss = model(x).float().square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(2):
                step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(2):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            return True, "2 steps, no host-device synchronisation"

        run_check(ctx, sec, f"training step {kind}", case)


def section_graph(ctx: Ctx) -> None:
    """Capture FB.gelu forward + backward in a CUDA graph and compare a replay with eager."""
    def case():
        import fewbit.functional as FB

        x = torch.randn(1 << 20, device=ctx.dev, requires_grad=True)
        g = torch.randn(1 << 20, device=ctx.dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs ask
            for _ in range(2):
                (gx,) = torch.autograd.grad(FB.gelu(x), x, g)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = FB.gelu(x)
            (gx,) = torch.autograd.grad(y, x, g)
        x.data.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        y_e = FB.gelu(x)
        (g_e,) = torch.autograd.grad(y_e, x, g)
        ok = torch.equal(y, y_e) and torch.equal(gx, g_e)
        return ok, f"captured; replay {'equals' if ok else 'DIFFERS from'} eager on new input"

    run_check(ctx, "graph", "torch.cuda.graph(FB.gelu fwd+bwd)", case)


# --- 4. speed -------------------------------------------------------------------------------


def cuda_ms(fn: Callable[[], Any], reps: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_gbs(ctx: Ctx, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth: (read + written bytes) / median time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / (cuda_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def speed_rows(ctx: Ctx, n: int, dt: torch.dtype, copy: float) -> None:
    """Kernel, autograd-op and quantizer times at ``n`` elements of ``dt`` (CUDA events)."""
    import fewbit.functional as FB
    from fewbit import kernels
    from fewbit.approx import get_table, normalize_params
    from fewbit.codecs import quantize as cq

    sec, tag = "speed", f"{n >> 20}M {str(dt)[6:]}"
    params = normalize_params("gelu", {})
    table = get_table("gelu", 3, params)
    bounds = torch.tensor(table.boundaries, dtype=torch.float64, device=ctx.dev)
    levels = torch.tensor(table.levels, dtype=torch.float32, device=ctx.dev)
    size = torch.tensor([], dtype=dt).element_size()
    x = torch.randn(n, device=ctx.dev).to(dt)
    g = torch.randn(n, device=ctx.dev).to(dt)

    def pct(nbytes_per_elem: float, ms: float) -> float:
        return 100 * nbytes_per_elem * n / (ms * 1e-3) / 1e9 / copy

    _, packed = kernels.activation_forward(x, "gelu", params, bounds, False, 3)
    fk = cuda_ms(lambda: kernels.activation_forward(x, "gelu", params, bounds, False, 3))
    bk = cuda_ms(lambda: kernels.activation_backward(g, packed, levels, 3))
    ft = cuda_ms(lambda: F.gelu(x))
    bt = cuda_ms(lambda: torch.ops.aten.gelu_backward(g, x))
    moved = 2 * size + 3 / 8
    record(sec, f"gelu3 kernels {tag}", "info",
           f"fwd {fk:.3f} ms ({pct(moved, fk):.0f}% copy), bwd {bk:.3f} ms "
           f"({pct(moved, bk):.0f}%); fwd+bwd x{(fk + bk) / (ft + bt):.2f} torch's "
           f"{ft + bt:.3f} ms")  # fmt: skip
    xr = x.detach().requires_grad_(True)
    lib_ms = cuda_ms(lambda: torch.autograd.grad(FB.gelu(xr), xr, g), reps=5)
    ref_ms = cuda_ms(lambda: torch.autograd.grad(F.gelu(xr), xr, g), reps=5)
    record(sec, f"FB.gelu autograd fwd+bwd {tag}", "info",
           f"{lib_ms:.3f} ms vs torch {ref_ms:.3f} ms (x{lib_ms / ref_ms:.2f})")
    xq = x.view(-1, 4096)
    q = cq.quantize(xq, 2, 256)
    qf = cuda_ms(lambda: cq.quantize(xq, 2, 256))
    qb = cuda_ms(lambda: cq.dequantize(q))
    qbytes = size + 2 / 8 + 4 / 256
    record(sec, f"quantize b2 G256 {tag}", "info",
           f"quant {qf:.3f} ms ({pct(qbytes, qf):.0f}% copy), dequant {qb:.3f} ms "
           f"({pct(qbytes, qb):.0f}%), both {pct(2 * qbytes, qf + qb):.0f}%")  # fmt: skip


def section_speed(ctx: Ctx) -> None:
    copy = copy_gbs(ctx)
    record("speed", "device copy (read+write)", "info", f"{copy:.0f} GB/s")
    for n in (1 << 26, 1 << 28):
        for dt in (torch.float32, torch.bfloat16):
            if ctx.left() < 60:
                record("speed", f"{n >> 20}M {str(dt)[6:]}", "SKIP", "time budget")
                continue
            speed_rows(ctx, n, dt, copy)
            ctx.empty()


# --- 5. RoBERTa-base ------------------------------------------------------------------------

ROBERTA_CONFIGS = ("vanilla", "gelu3", "gelu3+rand20", "L2", "ckpt")


def section_roberta(ctx: Ctx, batch: int) -> None:
    sec = "roberta"
    try:
        import transformers  # noqa: F401
    except ImportError:
        record(sec, "roberta-base", "SKIP", "transformers not installed")
        return
    from fewbit.bench.configs import get_config
    from fewbit.bench.models import build_model, make_batch, resolve_spec

    if ctx.small:
        spec = resolve_spec("tiny", 2, 16)
    else:
        spec = resolve_spec("roberta-base-mrpc", batch, 128)
    base_ms: Optional[float] = None
    for name in ROBERTA_CONFIGS:
        if ctx.left() < 20:
            record(sec, name, "SKIP", "time budget")
            continue

        def case(name=name):
            nonlocal base_ms
            ctx.empty()
            model = get_config(name).apply(build_model(spec, seed=0)).to(ctx.dev)
            batch_t = {k: v.to(ctx.dev) for k, v in make_batch(spec, seed=0).items()}
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            box: dict[str, Any] = {}

            def step():
                loss = model(**batch_t).loss
                loss.backward()
                box["grads_finite"] = all(bool(torch.isfinite(p.grad).all())
                                          for p in model.parameters() if p.grad is not None)
                opt.step()
                opt.zero_grad(set_to_none=True)
                box["loss"] = loss.detach()

            with kernel_path(True) if ctx.small else contextlib.nullcontext():
                step()
                ctx.sync()
                if ctx.dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    ms = cuda_ms(step, reps=3, warmup=0)
                    peak = f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                else:
                    t = time.perf_counter()
                    step()
                    ms, peak = (time.perf_counter() - t) * 1e3, "peak n/a on CPU"
            base_ms = base_ms or ms
            ok = bool(torch.isfinite(box["loss"])) and box["grads_finite"]
            return ok, (f"{ms:.0f} ms/step (x{ms / base_ms:.2f} vanilla), {peak}, "
                        f"loss {float(box['loss']):.3f}")

        run_check(ctx, sec, f"{name} batch {spec.batch}x{spec.seq}", case)


# --- main -----------------------------------------------------------------------------------


def summarize() -> int:
    fails = [r for r in ROWS if r[2] == "FAIL"]
    print("\n" + "=" * 118)
    print(f"{'section':8} {'check':44} {'result':6} detail")
    print("-" * 118)
    for sec, check, status, detail in ROWS:
        print(f"{sec:8} {check[:44]:44} {status:6} {detail}")
    print("=" * 118)
    print(f"{len(fails)} FAIL, {sum(r[2] == 'PASS' for r in ROWS)} PASS, "
          f"{sum(r[2] == 'SKIP' for r in ROWS)} SKIP; {time.time() - T0:.0f} s")
    return 1 if fails else 0


def guarded(label: str, fatal: bool, fn: Callable[[], None]) -> None:
    """A section that crashes outside run_check: FAIL for correctness, info otherwise."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        record(label, "section aborted", "FAIL" if fatal else "info",
               f"{type(err).__name__}: {str(err)[:140]}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-big", action="store_true", help="skip the 2**31-element rows")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-roberta", action="store_true")
    parser.add_argument("--batch", type=int, default=128, help="roberta-base batch (128)")
    parser.add_argument("--budget", type=float, default=290.0,
                        help="seconds; later optional rows skip when it runs out")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="toy sizes on the CPU under TRITON_INTERPRET=1: tests this script")
    args = parser.parse_args(argv)
    ctx = Ctx(budget_s=args.budget, t0=time.time())
    if args.cpu_dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-dry-run needs TRITON_INTERPRET=1 before triton is imported",
                  file=sys.stderr)
            return 2
        ctx.dev, ctx.small = "cpu", True
        torch.manual_seed(0)
        guarded("check", True, lambda: section_check(ctx))
        if not args.skip_big:
            guarded("big", True, lambda: section_big(ctx))
        if not args.skip_roberta:
            guarded("roberta", True, lambda: section_roberta(ctx, args.batch))
        return summarize()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("FEWBIT_DISABLE_TRITON") == "1":
        print("unset TRITON_INTERPRET and FEWBIT_DISABLE_TRITON for a GPU run", file=sys.stderr)
        return 2
    import triton

    import fewbit

    cap = "".join(map(str, torch.cuda.get_device_capability()))
    print(f"{torch.cuda.get_device_name()} sm_{cap}, torch {torch.__version__}, triton "
          f"{triton.__version__}, fewbit {fewbit.__version__} ({os.path.dirname(fewbit.__file__)})",
          flush=True)
    torch.manual_seed(0)
    guarded("check", True, lambda: section_check(ctx))
    if not args.skip_big:
        guarded("big", True, lambda: section_big(ctx))
    guarded("sync", True, lambda: section_sync(ctx))
    if not args.skip_roberta:
        guarded("roberta", True, lambda: section_roberta(ctx, args.batch))
    if not args.skip_speed:
        guarded("speed", False, lambda: section_speed(ctx))
    guarded("graph", True, lambda: section_graph(ctx))  # last: a failed capture can poison
    return summarize()


if __name__ == "__main__":
    sys.exit(main())
