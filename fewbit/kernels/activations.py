"""Fused few-bit activations in Triton: one pass forward, one pass backward.

Forward reads x, computes y = f(x) in float32 (torch's formulas; GELU and SiLU bit for
bit as torch computes them on CUDA, see :mod:`.fmath`), finds each element's code (an
exact mask bit, or the count of table boundaries strictly below x or |x|) and packs the
codes in the layout of :mod:`fewbit.codecs.bitpack`: up to 4 bits, ``bits`` int32 words
per 32 codes (a block's codes are in one program), and a second launch stores the last
n % 32 codes bytewise; 5 to 8 bits, bytewise throughout. Backward unpacks the codes,
looks up the level and multiplies it by the incoming gradient in float32.

Bytes moved per element (s = element size, b = bits): forward 2s + b/8,
backward 2s + b/8. Stored between the passes: b/8 per element. Instructions per element
(sm_90 SASS, ``benchmarks/kernel_sass.py``): bf16 3-bit GELU forward about 35.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..approx.functions import CONTINUOUS, normalize_params
from ..approx.registry import kernel_ids, kernel_mask_params
from ..codecs.bitpack import check_bits, packed_nbytes
from . import fmath
from .bitpack import byte_pad, load_packed, store_packed
from .launch import (
    FLOAT_DTYPES,
    NUM_WARPS,
    check_launchable,
    device_guard,
    groups_per_program,
    precise,
)

__all__ = ["MASKED", "activation_backward", "activation_forward"]

# Activation ids (compile-time constants of the forward kernel) and mask parameters come from
# the activation registry (fewbit.approx.registry): ids below 10 use an exact 1-bit mask, the
# others a boundary table; the branches of _forward_value below are numbered by these ids.
_IDS: dict[str, int] = kernel_ids()

MASKED: dict[str, dict[str, float]] = kernel_mask_params()
"""Mask (1-bit) activations and their parameters with defaults (nan: required)."""

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

Params = Mapping[str, float]
Boundaries = Union[Tensor, Sequence[float]]


# --- kernel pieces ---------------------------------------------------------------------------


@triton.jit
def _forward_value(x, a, b, c, ACT: tl.constexpr, PRECISE: tl.constexpr, DTYPE: tl.constexpr):
    """y = f(x) in float32; a, b, c are the activation's float32 parameters.

    Divisions are IEEE-rounded (``div_rn``; compiled ``/`` is approximate), as in torch.
    """
    if ACT == 0:  # relu (NaN stays NaN)
        y = tl.where(x <= 0.0, 0.0, x)
    elif ACT == 1:  # leaky_relu, a = slope
        y = tl.where(x > 0.0, x, x * a)
    elif ACT == 2:  # threshold, a = threshold, b = value
        y = tl.where(x <= a, b, x)
    elif ACT == 3:  # hardsigmoid
        y = tl.math.div_rn(tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0), 6.0)
    elif ACT == 4:  # hardtanh, a = min_val, b = max_val
        y = tl.where(x < a, a, tl.where(x > b, b, x))
    elif ACT == 5:  # hardshrink, c = lambd rounded to the input dtype (as torch compares)
        y = tl.where((x >= -c) & (x <= c), 0.0, x)
    elif ACT == 6:  # softshrink, a = lambd
        y = tl.where(x > a, x - a, tl.where(x < -a, x + a, 0.0))
    elif ACT == 10:  # elu family, a = scale, b = alpha * scale, c = input scale
        y = tl.where(x <= 0.0, fmath.expm1(tl.minimum(x, 0.0) * c, PRECISE) * b, x * a)
    elif ACT == 11:  # gelu (torch's float32 formula with CUDA's erff, bit for bit)
        y = fmath.gelu_fast(x)
    elif ACT == 12:  # gelu_tanh
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        y = 0.5 * x * (1.0 + fmath.tanh(inner, PRECISE))
    elif ACT == 13:  # hardswish
        y = tl.math.div_rn(x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0), 6.0)
    elif ACT == 14:  # logsigmoid
        y = tl.minimum(x, 0.0) - fmath.log1p(fmath.exp(-tl.abs(x), PRECISE), PRECISE)
    elif ACT == 15:  # mish
        y = x * fmath.tanh(fmath.log1p(fmath.exp(x, PRECISE), PRECISE), PRECISE)
    elif ACT == 16:  # sigmoid
        y = tl.math.div_rn(1.0, 1.0 + fmath.exp(-x, PRECISE))
    elif ACT == 17:  # silu (torch's x / (1 + exp(-x)), bit for bit)
        y = fmath.silu_fast(x, PRECISE)
    elif ACT == 18:  # softplus, a = beta, b = threshold
        xb = x * a
        sp = fmath.log1p(fmath.exp(tl.where(xb > b, b, xb), PRECISE), PRECISE)
        y = tl.where(xb > b, x, tl.math.div_rn(sp, a))
    elif ACT == 19:  # softsign: torch rounds 1 + |x| to the input dtype first
        y = tl.math.div_rn(x, fmath.round_to(tl.abs(x) + 1.0, DTYPE).to(tl.float32))
    elif ACT == 20:  # tanh
        y = fmath.tanh(x, PRECISE)
    else:  # 21, tanhshrink: torch rounds tanh(x) to the input dtype first
        y = x - fmath.round_to(fmath.tanh(x, PRECISE), DTYPE).to(tl.float32)
    return y


@triton.jit
def _mask_code(x, c, d, ACT: tl.constexpr):
    """The exact 1-bit code of a piecewise-linear activation (c, d: dtype-rounded params)."""
    if ACT <= 1:  # relu, leaky_relu
        m = x > 0.0
    elif ACT == 2:  # threshold
        m = x > c
    elif ACT == 3:  # hardsigmoid
        m = (x > -3.0) & (x < 3.0)
    elif ACT == 4:  # hardtanh
        m = (x > c) & (x < d)
    else:  # hardshrink, softshrink
        m = (x < -c) | (x > c)
    return m.to(tl.int32)


@triton.jit
def _tagged(bounds_ptr, k, tag, DTYPE: tl.constexpr):
    """Boundary k's float32 bits moved within one dtype step, with ``tag`` in the low bits.

    For x of a 16-bit dtype (``DTYPE``), whose float32 patterns end in zeros below a step
    (bfloat16: 0x10000, float16: 0x2000; t is a value of the dtype too), ``x > t`` is
    unchanged: the result lies in [t, next dtype value above t) (negative t: one step toward
    zero, then the tag, 1 <= tag < step); -0 counts as +0, +inf becomes a positive NaN
    (nothing is above either) and -inf a finite value below every finite x.
    """
    if DTYPE == tl.bfloat16:
        step: tl.constexpr = 0x10000
    else:
        step: tl.constexpr = 0x2000
    t = tl.load(bounds_ptr + k) + 0.0  # -0.0 + 0.0 = +0.0
    tb = t.to(tl.int32, bitcast=True)
    return tl.where(tb < 0, tb - step, tb) | tag


@triton.jit
def _even_bound(bounds_ptr, k: tl.constexpr, DTYPE: tl.constexpr):
    """Boundary k (even) as int32 bits, tagged with k + 1 (:func:`_tagged`) for 16-bit x."""
    if DTYPE != tl.float32:
        return _tagged(bounds_ptr, k, k + 1, DTYPE)
    else:
        return tl.load(bounds_ptr + k).to(tl.int32, bitcast=True)


@triton.jit
def _table_code(
    x,
    bounds_ptr,
    NB: tl.constexpr,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Number of boundaries strictly below x (|x| if SYMMETRIC); the boundaries are sorted.

    NaN, as ``Table.encode``: 0 up to 4 bits (comparison count), NB above (torch.bucketize).
    2 to 4 bits: a branch-free binary search (BITS compares); for 16-bit inputs (DTYPE) the
    last level's boundaries carry their code in low bits (:func:`_tagged`), so the code is
    one mask of the selected boundary, with the last compare as a sign bit (no predicate).
    """
    if SYMMETRIC:
        src = tl.abs(x)
    else:
        src = x
    code = tl.zeros(x.shape, dtype=tl.int32)
    if BITS == 2:  # branch-free binary search over the sorted table: 2 compares, not 3
        hi = tl.load(bounds_ptr + 1) < src
        mid = tl.where(hi, tl.load(bounds_ptr + 2), tl.load(bounds_ptr))
        code = hi.to(tl.int32) * 2 + (mid < src).to(tl.int32)
    elif BITS == 3 and DTYPE != tl.float32:
        # 3 compares; the last-level boundaries carry their code in low bits that no
        # comparison with a dtype value can see (see _tagged)
        t1 = tl.load(bounds_ptr + 1)
        t3 = tl.load(bounds_ptr + 3)
        t5 = tl.load(bounds_ptr + 5)
        e0 = _tagged(bounds_ptr, 0, 1, DTYPE)
        e2 = _tagged(bounds_ptr, 2, 3, DTYPE)
        e4 = _tagged(bounds_ptr, 4, 5, DTYPE)
        e6 = _tagged(bounds_ptr, 6, 7, DTYPE)
        p2 = t3 < src
        p1 = tl.where(p2, t5, t1) < src
        last = tl.where(p1, tl.where(p2, e6, e2), tl.where(p2, e4, e0))
        code = last & (fmath.less_bit(last.to(tl.float32, bitcast=True), src) | 6)
    elif BITS == 4:  # the same with 4 compares, not 15 (tags only for 16-bit inputs)
        t1 = tl.load(bounds_ptr + 1)
        t3 = tl.load(bounds_ptr + 3)
        t5 = tl.load(bounds_ptr + 5)
        t7 = tl.load(bounds_ptr + 7)
        t9 = tl.load(bounds_ptr + 9)
        t11 = tl.load(bounds_ptr + 11)
        t13 = tl.load(bounds_ptr + 13)
        p3 = t7 < src
        p2 = tl.where(p3, t11, t3) < src
        p1 = tl.where(p2, tl.where(p3, t13, t5), tl.where(p3, t9, t1)) < src
        hi = tl.where(
            p2,
            tl.where(p3, _even_bound(bounds_ptr, 14, DTYPE), _even_bound(bounds_ptr, 6, DTYPE)),
            tl.where(p3, _even_bound(bounds_ptr, 10, DTYPE), _even_bound(bounds_ptr, 2, DTYPE)),
        )
        lo = tl.where(
            p2,
            tl.where(p3, _even_bound(bounds_ptr, 12, DTYPE), _even_bound(bounds_ptr, 4, DTYPE)),
            tl.where(p3, _even_bound(bounds_ptr, 8, DTYPE), _even_bound(bounds_ptr, 0, DTYPE)),
        )
        last = tl.where(p1, hi, lo)
        if DTYPE != tl.float32:
            code = last & (fmath.less_bit(last.to(tl.float32, bitcast=True), src) | 14)
        else:
            code = (
                p3.to(tl.int32) * 8
                + p2.to(tl.int32) * 4
                + p1.to(tl.int32) * 2
                + (last.to(tl.float32, bitcast=True) < src).to(tl.int32)
            )
    elif BITS == 3:  # 3 compares, not 7 (NaN: every compare false, code 0 as the count)
        # bounds chosen by bit masks (integer ops), so no predicate stays live
        b0 = tl.load(bounds_ptr).to(tl.int32, bitcast=True)
        b1 = tl.load(bounds_ptr + 1).to(tl.int32, bitcast=True)
        b2 = tl.load(bounds_ptr + 2).to(tl.int32, bitcast=True)
        b4 = tl.load(bounds_ptr + 4).to(tl.int32, bitcast=True)
        b5 = tl.load(bounds_ptr + 5).to(tl.int32, bitcast=True)
        b6 = tl.load(bounds_ptr + 6).to(tl.int32, bitcast=True)
        m2 = -((tl.load(bounds_ptr + 3) < src).to(tl.int32))
        mid = b1 ^ (m2 & (b1 ^ b5))
        m1 = -((mid.to(tl.float32, bitcast=True) < src).to(tl.int32))
        lo = b0 ^ (m2 & (b0 ^ b4))
        hi = b2 ^ (m2 & (b2 ^ b6))
        last = lo ^ (m1 & (lo ^ hi))
        c0 = (last.to(tl.float32, bitcast=True) < src).to(tl.int32)
        code = (m2 & 4) | (m1 & 2) | c0
    elif BITS <= 4:  # 1 or 4 bits: count, NB scalar loads and compares
        for k in tl.static_range(NB):
            code += (tl.load(bounds_ptr + k) < src).to(tl.int32)
    else:  # binary search: BITS gathers from the (cached) boundary table
        for s in tl.static_range(BITS):
            cand = code + (1 << (BITS - 1 - s))
            bound = tl.load(bounds_ptr + (cand - 1))
            code = tl.where(bound < src, cand, code)
        code = tl.where(src != src, NB, code)
    return code


@triton.jit
def _group_words(code, BITS: tl.constexpr):
    """[G, 8] codes below 2**BITS (BITS <= 4) -> [G] int32 words, code j at bits j*BITS."""
    j = tl.arange(0, 8)
    return tl.sum(code << (j * BITS)[None, :], axis=1)


@triton.jit
def _store_words(words_ptr, word, nq, BITS: tl.constexpr, Q: tl.constexpr):
    """Store Q blocks of 4 group words (32 codes) as BITS int32 words each at ``words_ptr``.

    Block q's words are the packed layout's bytes [4*BITS*q, 4*BITS*(q+1)) read as
    little-endian int32; blocks q >= ``nq`` are not stored.
    """
    g02, g13 = tl.split(tl.reshape(word, (Q, 2, 2)))
    g0, g2 = tl.split(g02)
    g1, g3 = tl.split(g13)
    q = tl.arange(0, Q)
    ok = q < nq
    p = words_ptr + q * BITS
    if BITS == 1:
        tl.store(p, g0 | (g1 << 8) | (g2 << 16) | (g3 << 24), mask=ok)
    elif BITS == 2:
        tl.store(p, g0 | (g1 << 16), mask=ok)
        tl.store(p + 1, g2 | (g3 << 16), mask=ok)
    elif BITS == 3:
        tl.store(p, g0 | (g1 << 24), mask=ok)
        tl.store(p + 1, (g1 >> 8) | (g2 << 16), mask=ok)
        tl.store(p + 2, (g2 >> 16) | (g3 << 8), mask=ok)
    else:
        tl.store(p, g0, mask=ok)
        tl.store(p + 1, g1, mask=ok)
        tl.store(p + 2, g2, mask=ok)
        tl.store(p + 3, g3, mask=ok)


@triton.jit
def _forward_kernel(
    x_ptr,
    y_ptr,
    packed_ptr,
    bounds_ptr,
    n,
    nbytes,
    a,
    b,
    c,
    d,
    ACT: tl.constexpr,
    BITS: tl.constexpr,
    P: tl.constexpr,
    NB: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    GROUPS: tl.constexpr,
    PRECISE: tl.constexpr,
    WORDS: tl.constexpr,
):
    """One program: GROUPS groups of 8 elements from ``start``; offsets inside it are int32.

    WORDS (BITS <= 4, n a multiple of 32): codes stored as int32 words, BITS per 32 codes
    (no byte stores, no masks on codes). Otherwise byte stores below ``nbytes`` (the tail
    of fewer than 32 elements, and 5 to 8 bits).
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (GROUPS * 8)
    loc = tl.arange(0, GROUPS)[:, None] * 8 + tl.arange(0, 8)[None, :]
    count = tl.minimum(n - start, GROUPS * 8).to(tl.int32)
    inside = loc < count
    x_raw = tl.load(x_ptr + start + loc, mask=inside, other=0.0)
    if x_raw.dtype == tl.bfloat16:  # the exact widening as bit operations
        x = (x_raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x_raw.to(tl.float32)
    y = _forward_value(x, a, b, c, ACT, PRECISE, x_raw.dtype)
    tl.store(y_ptr + start + loc, fmath.round_to(y, x_raw.dtype), mask=inside)
    if ACT < 10:
        code = _mask_code(x, c, d, ACT)
    else:
        code = _table_code(x, bounds_ptr, NB, BITS, SYMMETRIC, x_raw.dtype)
    if WORDS:
        # GROUPS * 8 codes of BITS bits: GROUPS * BITS / 4 words per program
        words_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
        words_ptr += pid.to(tl.int64) * (GROUPS // 4 * BITS)
        _store_words(words_ptr, _group_words(code, BITS), count // 32, BITS, GROUPS // 4)
    else:
        code = tl.where(inside, code, 0)
        group = pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
        store_packed(packed_ptr, group, code, nbytes, BITS, P)


@triton.jit
def _backward_kernel(
    grad_ptr,
    packed_ptr,
    levels_ptr,
    out_ptr,
    n,
    nbytes,
    BITS: tl.constexpr,
    P: tl.constexpr,
    GROUPS: tl.constexpr,
    ZERO_EXACT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    group = pid * GROUPS + tl.arange(0, GROUPS)
    offs = group[:, None] * 8 + tl.arange(0, 8)[None, :]
    inside = offs < n
    code = load_packed(packed_ptr, group, nbytes, BITS, P)
    g_raw = tl.load(grad_ptr + offs, mask=inside, other=0.0)
    if BITS == 1:
        level = tl.where(code != 0, tl.load(levels_ptr + 1), tl.load(levels_ptr))
    else:
        level = tl.load(levels_ptr + code)
    out = g_raw.to(tl.float32) * level
    if ZERO_EXACT:  # a zero level gives 0 even for an inf/NaN gradient (torch's where)
        out = tl.where(level == 0.0, 0.0, out)
    tl.store(out_ptr + offs, fmath.round_to(out, g_raw.dtype), mask=inside)


# --- host side -------------------------------------------------------------------------------


def _as_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (how torch compares a tensor with a Python scalar)."""
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).item())


def _masked_args(
    name: str, params: Params | None, dtype: torch.dtype
) -> tuple[int, float, float, float, float]:
    """(id, a, b, c, d) of a mask activation: a, b for y; c, d (dtype-rounded) for the mask."""
    given = dict(params or {})
    unknown = set(given) - set(MASKED[name])
    if unknown:
        raise ValueError(f"{name} takes no parameter(s) {sorted(unknown)}")
    p = {**MASKED[name], **{k: float(v) for k, v in given.items()}}
    missing = [k for k, v in p.items() if math.isnan(v) and k not in given]
    if missing:
        raise ValueError(f"{name} needs parameter(s) {missing}")
    if name == "relu":
        return _IDS[name], 0.0, 0.0, 0.0, 0.0
    if name == "leaky_relu":
        return _IDS[name], p["negative_slope"], 0.0, 0.0, 0.0
    if name == "threshold":
        th = p["threshold"]
        return _IDS[name], th, p["value"], _as_dtype(th, dtype), 0.0
    if name == "hardsigmoid":
        return _IDS[name], 0.0, 0.0, 0.0, 0.0
    if name in ("hardtanh", "relu6"):
        lo, hi = (0.0, 6.0) if name == "relu6" else (p["min_val"], p["max_val"])
        if lo > hi:
            raise ValueError(f"max_val ({hi}) cannot be lower than min_val ({lo})")
        return _IDS[name], lo, hi, _as_dtype(lo, dtype), _as_dtype(hi, dtype)
    lam = p["lambd"]
    if name == "softshrink" and lam < 0:
        raise ValueError(f"lambd must be >= 0, got {lam}")
    act = _IDS[name]
    return act, lam, 0.0, _as_dtype(lam, dtype), 0.0


def _table_args(name: str, params: Params | None) -> tuple[int, float, float, float]:
    """(id, a, b, c) of a table activation, as torch computes its float32 coefficients."""
    p = normalize_params(name, params)
    f32 = _as_float32
    if name in ("elu", "celu", "selu"):
        if name == "selu":
            alpha, scale, in_scale = _SELU_ALPHA, _SELU_SCALE, 1.0
        else:
            alpha, scale = p["alpha"], 1.0
            in_scale = 1.0 / alpha if name == "celu" else 1.0
        return _IDS[name], f32(scale), f32(f32(alpha) * f32(scale)), f32(in_scale)
    if name == "softplus":
        return _IDS[name], p["beta"], p["threshold"], 0.0
    return _IDS[name], 0.0, 0.0, 0.0


def _as_float32(value: float) -> float:
    return _as_dtype(value, torch.float32)


def _bounds_tensor(boundaries: Boundaries | None, bits: int, x: Tensor) -> Tensor:
    """Boundaries rounded to x.dtype (as Table.encode compares), held as float32 on x's device."""
    if boundaries is None:
        raise ValueError("boundaries are required for a table activation")
    if isinstance(boundaries, Tensor):
        b = boundaries.detach().reshape(-1).to(device=x.device)
    else:
        b = torch.tensor([float(v) for v in boundaries], dtype=torch.float64, device=x.device)
    if b.numel() != (1 << bits) - 1:
        raise ValueError(
            f"boundaries must have 2**bits - 1 = {(1 << bits) - 1} entries, got {b.numel()}"
        )
    return b.to(x.dtype).to(torch.float32).contiguous()


def _check_float(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16 for the kernels, got {t.dtype}"
        )
    check_launchable(t, name)


def _grid(n: int, groups: int) -> tuple[int]:
    return (triton.cdiv(triton.cdiv(n, 8), groups),)


def activation_forward(
    x: Tensor,
    name: str,
    params: Params | None = None,
    boundaries: Boundaries | None = None,
    symmetric: bool = False,
    bits: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fused forward: ``(y, packed)`` with y = f(x) (x's dtype and shape) and the packed codes.

    ``name``: a key of :data:`MASKED` (exact 1-bit mask; ``bits`` must be 1, ``boundaries``
    None) or of :data:`fewbit.approx.CONTINUOUS` (code = boundaries strictly below x, or |x|
    if ``symmetric``; ``boundaries`` has 2**bits - 1 increasing entries; pass float64 values
    so they round once to x.dtype, like ``Table.encode``). ``packed`` is uint8 of exactly
    ``ceil(n*bits/8)`` bytes, the layout of :func:`fewbit.codecs.bitpack.pack`.
    Moves 2*itemsize + bits/8 bytes per element; keeps bits/8 per element.
    """
    _check_float(x, "x")
    check_bits(bits)
    if name in MASKED:
        if bits != 1:
            raise ValueError(f"{name} uses an exact 1-bit mask: bits must be 1, got {bits}")
        if boundaries is not None:
            raise ValueError(f"{name} uses an exact mask: boundaries must be None")
        act, a, b, c, d = _masked_args(name, params, x.dtype)
        bounds = torch.zeros(1, dtype=torch.float32, device=x.device)
    elif name in CONTINUOUS and name in _IDS:
        act, a, b, c = _table_args(name, params)
        d = 0.0
        bounds = _bounds_tensor(boundaries, bits, x)
    else:
        known = sorted(_IDS)
        raise ValueError(f"unknown activation {name!r}; expected one of {known}")
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    y = torch.empty_like(flat)
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    # whole blocks of 32 codes as int32 words (BITS of them per block), the rest as bytes
    n_words = n - n % 32 if bits <= 4 else 0
    consts = dict(ACT=act, BITS=bits, P=byte_pad(bits), NB=(1 << bits) - 1,
                  SYMMETRIC=bool(symmetric), PRECISE=precise(flat), num_warps=NUM_WARPS)
    with device_guard(flat):
        for lo, hi, words in ((0, n_words, True), (n_words, n, False)):
            if hi == lo:
                continue
            groups = groups_per_program(flat)
            b0 = lo * bits // 8  # a multiple of 4 * bits: word-aligned
            _forward_kernel[_grid(hi - lo, groups)](
                flat[lo:hi], y[lo:hi], packed[b0:], bounds, hi - lo, nbytes - b0, a, b, c, d,
                GROUPS=groups, WORDS=words, **consts,
            )  # fmt: skip
    return y.view(x.shape), packed


def activation_backward(
    grad: Tensor,
    packed: Tensor,
    levels: Tensor,
    bits: int,
    out: Tensor | None = None,
    zero_exact: bool = False,
) -> Tensor:
    """``grad * levels[code]`` (float32 product, rounded to grad's dtype), codes from ``packed``.

    ``zero_exact``: where the level is 0 the result is 0 even for an inf/NaN gradient (as
    torch's piecewise-linear backward selects 0); one more instruction per element.

    ``levels``: 2**bits values (any float dtype; used as float32). Output: grad's shape and
    dtype, written into ``out`` when given (a contiguous tensor of grad's dtype and numel,
    returned viewed as grad's shape). Moves 2*itemsize + bits/8 bytes per element.
    """
    _check_float(grad, "grad")
    check_bits(bits)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor")
    n = grad.numel()
    nbytes = packed_nbytes(n, bits)
    if packed.numel() != nbytes:
        raise ValueError(f"packed has {packed.numel()} bytes, expected {nbytes} for {n} codes")
    if levels.numel() != 1 << bits:
        raise ValueError(f"levels must have 2**bits = {1 << bits} entries, got {levels.numel()}")
    lv = levels.detach().reshape(-1).to(device=grad.device, dtype=torch.float32).contiguous()
    flat = grad.reshape(-1).contiguous()
    if out is None:
        out = torch.empty_like(flat)
    elif out.dtype != grad.dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of grad's dtype and numel")
    if n > 0:
        groups = groups_per_program(flat)
        with device_guard(flat):
            _backward_kernel[_grid(n, groups)](
                flat, packed.reshape(-1).contiguous(), lv, out, n, nbytes,
                BITS=bits, P=byte_pad(bits), GROUPS=groups, ZERO_EXACT=bool(zero_exact),
                num_warps=NUM_WARPS,
            )  # fmt: skip
    return out.view(grad.shape)
