"""Ahead-of-time SASS report of fewbit's Triton kernels, no GPU needed.

Each main kernel variant is compiled for an H100-class GPU (``sm_90``, default) with the
compiler inside the triton wheel: a stand-in Triton driver reports the target, so
``JITFunction.warmup`` specialises the kernel on (CPU) tensors and scalars exactly as a launch
would (16-byte aligned pointers, sizes divisible by 16) and compiles it without launching.
Then ``cuobjdump -res-usage`` (registers, stack and local memory: spills go there) and
``cuobjdump -sass`` from ``triton/backends/nvidia/bin`` read the cubin.

Instructions per element = static SASS instructions (NOP and the trailing self-branch
excluded) x threads per program / elements per program. That is thread-instructions per
element, comparable with an H100 SXM's budget: about 33 T thread-instructions/s against
3.35 TB/s, i.e. about 10 instructions per byte moved. A kernel declared with a main loop
(``Variant.loop``) is reported per loop iteration (its body only, per element handled in one
iteration). Static counts include both sides of any branch (and slow paths such as sin/cos
range reduction), so they bound the executed count from above.

Goals (issue 12): activation forward <= 40 and backward <= 25 instructions per element
(bf16, 3 bits); quantize <= 40 and dequantize <= 20 (2 bits); no spills. The quantize rows
compile as launched (``enable_fp_fusion=False``, ``Variant.options``): rows of whole groups
(``_quantize_whole_kernel``), and ``tail``, the masked kernel for other layouts.

Run: ``python benchmarks/kernel_sass.py [--arch 90] [--only NAME ...] [--json out.json]
[--sass DIR]`` (``TRITON_INTERPRET`` must be unset; about 2-5 s per variant). Exit status 1
when a variant fails to compile or misses its goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

SIZE = 1 << 24  # the element count the scalars describe (divisible by 16, like real launches)


@dataclass
class Variant:
    """One kernel specialisation: how to build its launch and how many elements it covers."""

    name: str
    module: str  # fewbit.kernels.<module>
    kernel: str  # attribute name of the @triton.jit function
    build: Callable[[Any], tuple[dict[str, Any], dict[str, Any], int]]  # args, constexprs, warps
    elements: Callable[[dict[str, Any]], int]  # elements per program (or per loop iteration)
    goal: Optional[float] = None  # instructions per element
    note: str = ""
    loop: bool = False  # the kernel loops over its inner dimension: count the loop body
    options: dict[str, Any] = field(default_factory=dict)  # compile options of the launch


@dataclass
class Result:
    name: str
    ok: bool
    registers: Optional[int] = None
    stack: Optional[int] = None
    local: Optional[int] = None
    instructions: Optional[int] = None
    loop_body: Optional[int] = None
    threads: Optional[int] = None
    elements: Optional[int] = None
    per_element: Optional[float] = None
    goal: Optional[float] = None
    compile_s: Optional[float] = None
    top_opcodes: list[tuple[str, int]] = field(default_factory=list)
    error: str = ""
    note: str = ""

    @property
    def spills(self) -> Optional[int]:
        if self.stack is None or self.local is None:
            return None
        return self.stack + self.local

    @property
    def meets_goal(self) -> Optional[bool]:
        if self.per_element is None:
            return None
        fits = self.goal is None or self.per_element <= self.goal
        return fits and self.spills == 0


# --- stand-in driver -----------------------------------------------------------------------


class AotDriver:
    """What `JITFunction.warmup` asks of the active driver: the target, a device and stream."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary utility shipped in the triton wheel (FileNotFoundError if not)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in the triton wheel ({path})")
    return path


# --- SASS parsing --------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction text without predicate) of each SASS instruction, in order."""
    out = []
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            instr = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2).strip())
            out.append((int(m.group(1), 16), instr))
    return out


def _branch_target(instr: str, labels: dict[str, int]) -> Optional[int]:
    m = re.search(r"\b(?:BRA|JMP)\b.*?(?:`\((\.L_x_\d+)\)|(\.L_x_\d+)|0x([0-9a-f]+))", instr)
    if not m:
        return None
    label = m.group(1) or m.group(2)
    if label:
        return labels.get(label)
    return int(m.group(3), 16)


def _labels(text: str) -> dict[str, int]:
    """Label -> address of the next instruction (cuobjdump prints ``.L_x_N:`` lines)."""
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        lab = re.match(r"^\s*(\.L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _INSTR.match(line)
        if m and pending:
            for p in pending:
                labels[p] = int(m.group(1), 16)
            pending = []
    return labels


def count_sass(text: str) -> tuple[int, Optional[int], Counter]:
    """(instructions, loop-body instructions or None, opcode counts) of one kernel's SASS.

    NOPs and the self-branch after EXIT are not counted. The loop body is the span of the
    largest backward branch (a loop over the kernel's inner dimension)."""
    instrs = parse_sass(text)
    labels = _labels(text)
    counted: list[tuple[int, str]] = []
    loop: Optional[tuple[int, int]] = None
    for addr, instr in instrs:
        opcode = instr.split()[0] if instr else ""
        if opcode == "NOP":
            continue
        target = _branch_target(instr, labels)
        if target is not None and target == addr:
            continue  # the trailing `BRA self` after EXIT
        if target is not None and target < addr:
            if loop is None or addr - target > loop[1] - loop[0]:
                loop = (target, addr)
        counted.append((addr, opcode))
    ops = Counter(op for _, op in counted)
    body = None if loop is None else sum(1 for a, _ in counted if loop[0] <= a <= loop[1])
    return len(counted), body, ops


def parse_res_usage(text: str) -> dict[str, int]:
    """REG, STACK, SHARED and LOCAL of the (single) function in ``cuobjdump -res-usage``."""
    out: dict[str, int] = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            out[key] = int(m.group(1))
    return out


# --- variants ------------------------------------------------------------------------------


def _t(dtype: Any, n: int = 64) -> Any:
    import torch

    return torch.empty(n, dtype=dtype)


def _act_id(mod: Any, name: str) -> int:
    ids = getattr(mod, "_IDS", None)
    if isinstance(ids, dict) and name in ids:
        return int(ids[name])
    return int(getattr(mod, "_" + name.upper()))


def _groups() -> tuple[int, int]:
    from fewbit.kernels import launch

    return int(getattr(launch, "GPU_GROUPS", 512)), int(getattr(launch, "NUM_WARPS", 4))


def kernel_params(kernel: Any) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of a kernel's parameters, in order: from a JIT function's
    ``params``, or (under ``TRITON_INTERPRET=1``) from the wrapped function's annotations."""
    if hasattr(kernel, "params"):
        return [(p.name, bool(p.is_constexpr)) for p in kernel.params]
    fn = getattr(kernel, "fn", kernel)
    return [(name, "constexpr" in str(p.annotation))
            for name, p in inspect.signature(fn).parameters.items()]  # fmt: skip


def _constexprs(mod: Any, kernel: str) -> set[str]:
    """Names of a kernel's compile-time parameters (variants built for older kernels skip new
    ones)."""
    return {name for name, const in kernel_params(getattr(mod, kernel)) if const}


def _act_forward(act: str, dtype_name: str, bits: int) -> Callable[[Any], Any]:
    def build(mod: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
        import torch

        from fewbit.kernels.bitpack import byte_pad

        dtype = getattr(torch, dtype_name)
        groups, warps = _groups()
        args = {"x_ptr": _t(dtype), "y_ptr": _t(dtype), "packed_ptr": _t(torch.uint8),
                "bounds_ptr": _t(torch.float32), "n": SIZE, "nbytes": SIZE * bits // 8,
                "a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}  # fmt: skip
        masked = bits == 1 and act in ("relu", "leaky_relu", "threshold", "hardtanh")
        consts = {"ACT": _act_id(mod, act), "BITS": bits, "P": byte_pad(bits),
                  "NB": (1 << bits) - 1, "SYMMETRIC": False, "GROUPS": groups,
                  "PRECISE": not masked, "WORDS": bits <= 4}  # fmt: skip
        consts = {k: v for k, v in consts.items() if k in _constexprs(mod, "_forward_kernel")}
        return args, consts, warps

    return build


def _act_backward(dtype_name: str, bits: int) -> Callable[[Any], Any]:
    def build(mod: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
        import torch

        from fewbit.kernels.bitpack import byte_pad

        dtype = getattr(torch, dtype_name)
        groups, warps = _groups()
        args = {"grad_ptr": _t(dtype), "packed_ptr": _t(torch.uint8),
                "levels_ptr": _t(torch.float32), "out_ptr": _t(dtype), "n": SIZE,
                "nbytes": SIZE * bits // 8}  # fmt: skip
        consts = {"BITS": bits, "P": byte_pad(bits), "GROUPS": groups, "ZERO_EXACT": bits == 1}
        return args, consts, warps  # ZERO_EXACT: masks with a zero level (relu)

    return build


def _quant_config(mod: Any, group: int) -> tuple[int, int]:
    return tuple(int(v) for v in mod._config(group))  # type: ignore[return-value]


def _quantize(dtype_name: str, bits: int, group: int, whole: bool = True) -> Callable[[Any], Any]:
    """whole: rows of whole groups (``_quantize_whole_kernel``); False: the masked kernel."""

    def build(mod: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
        import torch

        from fewbit.kernels.bitpack import byte_pad

        dtype = getattr(torch, dtype_name)
        gp, ng = _quant_config(mod, group)
        groups = SIZE // group
        lo_dtype = torch.float16 if dtype == torch.float16 else torch.bfloat16
        args = {"x_ptr": _t(dtype), "noise_ptr": _t(torch.float32),
                "packed_ptr": _t(torch.uint8), "lo_ptr": _t(lo_dtype),
                "scale_ptr": _t(torch.bfloat16), "seed_ptr": _t(torch.int64),
                "n_groups": groups, "groups_per_row": groups, "row_len": SIZE,
                "nbytes": SIZE * bits // 8}  # fmt: skip
        consts = {"BITS": bits, "P": byte_pad(bits), "G": group, "NG": ng, "GP": gp,
                  "LO_FP16": dtype == torch.float16, "HAS_NOISE": False}  # fmt: skip
        kernel = "_quantize_whole_kernel" if whole else "_quantize_kernel"
        consts["A"] = int(mod._chunks(group if whole else gp, dtype.itemsize))
        consts = {k: v for k, v in consts.items() if k in _constexprs(mod, kernel)}
        return args, consts, int(getattr(mod, "NUM_WARPS", 4))

    return build


def _dequantize(dtype_name: str, bits: int, group: int) -> Callable[[Any], Any]:
    def build(mod: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
        import torch

        from fewbit.kernels.bitpack import byte_pad

        dtype = getattr(torch, dtype_name)
        gp, ng = _quant_config(mod, group)
        groups = SIZE // group
        lo_dtype = torch.float16 if dtype == torch.float16 else torch.bfloat16
        args = {"packed_ptr": _t(torch.uint8), "lo_ptr": _t(lo_dtype),
                "scale_ptr": _t(torch.bfloat16), "out_ptr": _t(dtype), "n_groups": groups,
                "groups_per_row": groups, "row_len": SIZE, "nbytes": SIZE * bits // 8}  # fmt: skip
        consts = {"BITS": bits, "P": byte_pad(bits), "G": group, "NG": ng, "GP": gp}
        return args, consts, int(getattr(mod, "NUM_WARPS", 4))

    return build


def _pack(kernel_input: str, bits: int) -> Callable[[Any], Any]:
    def build(mod: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
        import torch

        groups, warps = _groups()
        args = {"codes_ptr": _t(torch.uint8), "packed_ptr": _t(torch.uint8), "n": SIZE,
                "nbytes": SIZE * bits // 8}  # fmt: skip
        return args, {"BITS": bits, "P": mod.byte_pad(bits), "GROUPS": groups}, warps

    return build


def _sketch(kind: str) -> Callable[[Any], Any]:
    def build(mod: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
        import torch

        block_j, block_g = mod._GPU_BLOCKS
        n, k = 16384, 3277  # RoBERTa-base at batch 128, 20% of the rows
        args = {"out_ptr": _t(torch.float32), "k": k, "start": 0, "count": n, "stride_j": n,
                "seed": 2**40 + 1}  # fmt: skip
        kind_id = mod._GAUSSIAN if kind == "gaussian" else mod._RADEMACHER
        consts = {"KIND": kind_id, "BLOCK_J": block_j, "BLOCK_G": block_g}
        return args, consts, int(getattr(mod, "_GPU_WARPS", 4))

    return build


def _per_group(c: dict[str, Any]) -> int:
    return int(c["GROUPS"]) * 8


def _per_tile(c: dict[str, Any]) -> int:
    return int(c["NG"]) * int(c["G"])


def _per_s_tile(c: dict[str, Any]) -> int:
    return int(c["BLOCK_J"]) * int(c["BLOCK_G"]) * 4


_NO_FUSION = {"enable_fp_fusion": False}  # as the quantizer launches (no FP contraction)

VARIANTS: list[Variant] = [
    Variant("act fwd gelu bf16 b3", "activations", "_forward_kernel",
            _act_forward("gelu", "bfloat16", 3), _per_group, 40.0),
    Variant("act fwd gelu fp32 b3", "activations", "_forward_kernel",
            _act_forward("gelu", "float32", 3), _per_group, 40.0),
    Variant("act fwd silu bf16 b3", "activations", "_forward_kernel",
            _act_forward("silu", "bfloat16", 3), _per_group, 40.0),
    Variant("act fwd relu bf16 b1", "activations", "_forward_kernel",
            _act_forward("relu", "bfloat16", 1), _per_group, 40.0),
    Variant("act bwd bf16 b3", "activations", "_backward_kernel",
            _act_backward("bfloat16", 3), _per_group, 25.0),
    Variant("act bwd fp32 b3", "activations", "_backward_kernel",
            _act_backward("float32", 3), _per_group, 25.0),
    Variant("act bwd bf16 b1", "activations", "_backward_kernel",
            _act_backward("bfloat16", 1), _per_group, 25.0),
    Variant("quantize bf16 b2 G256", "quantize", "_quantize_whole_kernel",
            _quantize("bfloat16", 2, 256), _per_tile, 40.0, "rows of whole groups",
            options=_NO_FUSION),
    Variant("quantize fp32 b2 G256", "quantize", "_quantize_whole_kernel",
            _quantize("float32", 2, 256), _per_tile, 40.0, "rows of whole groups",
            options=_NO_FUSION),
    Variant("quantize bf16 b2 G256 tail", "quantize", "_quantize_kernel",
            _quantize("bfloat16", 2, 256, whole=False), _per_tile, 40.0, "masked tails",
            options=_NO_FUSION),
    Variant("dequantize bf16 b2 G256", "quantize", "_dequantize_kernel",
            _dequantize("bfloat16", 2, 256), _per_tile, 20.0),
    Variant("pack b3", "bitpack", "_pack_kernel", _pack("codes", 3), _per_group),
    Variant("unpack b3", "bitpack", "_unpack_kernel", _pack("packed", 3), _per_group),
    Variant("sketch fill gaussian", "sketch", "_fill_kernel", _sketch("gaussian"),
            _per_s_tile, None, "per S entry, made once per call"),
    Variant("sketch fill rademacher", "sketch", "_fill_kernel", _sketch("rademacher"),
            _per_s_tile, None, "per S entry, made once per call"),
]  # fmt: skip


# --- compile and measure ---------------------------------------------------------------------


def _bind(kernel: Any, args: dict[str, Any], consts: dict[str, Any]) -> list[Any]:
    """Positional arguments in the kernel's order; a clear error when the signature moved."""
    params = kernel_params(kernel)
    names = [name for name, const in params if not const]
    const_names = {name for name, const in params if const}
    missing = [n for n in names if n not in args]
    missing_c = sorted(const_names - set(consts))
    unknown = sorted(set(consts) - const_names)
    if missing or missing_c or unknown:
        raise KeyError(
            f"kernel signature changed: arguments {missing} / constexprs {missing_c} not "
            f"provided, constexprs {unknown} no longer taken; update VARIANTS"
        )
    return [args[n] for n in names]


def measure(variant: Variant, workdir: str, sass_dir: Optional[str] = None) -> Result:
    """Compile one variant and read its cubin; never raises (the error goes in the result)."""
    import importlib

    res = Result(variant.name, False, goal=variant.goal, note=variant.note)
    try:
        mod = importlib.import_module(f"fewbit.kernels.{variant.module}")
        kernel = getattr(mod, variant.kernel)
        args, consts, warps = variant.build(mod)
        positional = _bind(kernel, args, consts)
        t0 = time.perf_counter()
        compiled = kernel.warmup(*positional, grid=(1,), num_warps=warps, **consts,
                                 **variant.options)  # fmt: skip
        res.compile_s = time.perf_counter() - t0
        cubin = os.path.join(workdir, re.sub(r"\W+", "_", variant.name) + ".cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([nvidia_tool("cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([nvidia_tool("cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        if sass_dir:
            with open(os.path.join(sass_dir, os.path.basename(cubin)[:-6] + ".sass"), "w") as f:
                f.write(sass)
        regs = parse_res_usage(usage)
        total, body, ops = count_sass(sass)
        res.registers, res.stack, res.local = regs.get("REG"), regs.get("STACK"), regs.get("LOCAL")
        # backward branches outside a main loop are slow paths (e.g. sin/cos range reduction)
        res.instructions, res.loop_body = total, body if variant.loop else None
        res.threads = int(compiled.metadata.num_warps) * 32
        res.elements = variant.elements(consts)
        counted = res.loop_body if res.loop_body is not None else total
        res.per_element = counted * res.threads / res.elements
        res.top_opcodes = ops.most_common(8)
        res.ok = True
    except Exception as err:  # noqa: BLE001 - one variant's failure must not stop the others
        res.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return res


def format_table(results: Sequence[Result], arch: int) -> str:
    head = (f"sm_{arch}: static SASS instructions x threads / elements = thread-instructions per "
            "element (loop kernels: loop body per element of one iteration)")  # fmt: skip
    cols = f"{'variant':26} {'regs':>4} {'spill':>5} {'instr':>6} {'loop':>5} {'elems':>6} " \
           f"{'instr/elem':>10} {'goal':>5} {'ok':>4} {'compile':>7}  top opcodes"
    lines = [head, cols]
    for r in results:
        if not r.ok:
            lines.append(f"{r.name:26} FAILED {r.error}")
            continue
        verdict = "-" if r.meets_goal is None else ("yes" if r.meets_goal else "NO")
        if r.goal is None:
            verdict = "yes" if r.spills == 0 else "NO"
        ops = " ".join(f"{op}:{n}" for op, n in r.top_opcodes[:6])
        lines.append(
            f"{r.name:26} {r.registers!s:>4} {r.spills!s:>5} {r.instructions!s:>6} "
            f"{'-' if r.loop_body is None else r.loop_body:>5} {r.elements!s:>6} "
            f"{r.per_element:10.1f} {'-' if r.goal is None else f'{r.goal:.0f}':>5} "
            f"{verdict:>4} {r.compile_s:6.1f}s  {ops}"
        )
    lines.append("spill = STACK + LOCAL bytes per thread (cuobjdump -res-usage); budget on an "
                 "H100: a bf16 3-bit activation stays memory-bound below ~85 for fwd+bwd")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90)")
    parser.add_argument("--only", nargs="*", default=None, help="variant names (substrings)")
    parser.add_argument("--json", default=None, help="write the results as JSON")
    parser.add_argument("--sass", default=None, help="directory for the SASS listings")
    parser.add_argument("--list", action="store_true", help="list the variants")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(v.name for v in VARIANTS))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        import triton  # noqa: F401

        nvidia_tool("cuobjdump")
    except (ImportError, FileNotFoundError) as err:
        print(f"cannot compile ahead of time: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, no warning
    from triton.runtime import driver

    driver.set_active(AotDriver(args.arch))
    chosen = [v for v in VARIANTS if not args.only or any(s in v.name for s in args.only)]
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="fewbit-sass-") as tmp:
        for v in chosen:
            r = measure(v, tmp, args.sass)
            print(f"  {v.name}: " + ("ok" if r.ok else r.error), file=sys.stderr, flush=True)
            results.append(r)
    print(format_table(results, args.arch))
    if args.json:
        payload = [{**dataclasses.asdict(r), "spills": r.spills, "meets_goal": r.meets_goal}
                   for r in results]  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "results": payload}, f, indent=2)
    bad = [r for r in results if not r.ok or r.meets_goal is False or (r.spills or 0) > 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
