"""Elementwise float32 math for the Triton kernels: exp, tanh, expm1, log1p, rounding.

``tl.math`` has no tanh, expm1 or log1p (and its exp is approximate on GPUs), and
the Triton interpreter supports no libdevice call. Each function therefore has two
implementations picked by the compile-time flag ``PRECISE``:

* ``PRECISE=True`` (compiled GPU kernels): libdevice, i.e. the CUDA/HIP math
  library that PyTorch's own GPU kernels call, so outputs track torch's closely.
* ``PRECISE=False`` (interpreter, tests): formulas on ``tl.exp``/``tl.log`` that
  avoid cancellation (Kahan's expm1/log1p corrections); a few ulp of float32.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import interpreting

__all__ = [
    "erf",
    "erf_fast",
    "exp",
    "expm1",
    "gelu_fast",
    "less_bit",
    "log1p",
    "round_to",
    "silu_fast",
    "tanh",
]

# True for compiled (GPU) kernels, False under the interpreter (fixed before triton is
# imported). Compiled kernels round float32 -> bfloat16 with the hardware conversion
# (cvt.rn.bf16x2.f32: nearest-even, overflow to inf, NaN to the canonical 0x7FFF; half an
# instruction per element) where the interpreter truncates, and use the ex2 instruction,
# which the interpreter lacks (inline assembly).
_COMPILED = tl.constexpr(not interpreting())


@triton.jit
def _ex2_approx(x):
    """2**x by the hardware approximation (MUFU.EX2, about 2 ulp; the interpreter: exact)."""
    if _COMPILED:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.math.exp2(x)


@triton.jit
def _rcp_approx(x):
    """1/x by the hardware approximation (MUFU.RCP, under 1 ulp; the interpreter: exact)."""
    if _COMPILED:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def silu_fast(x, PRECISE: tl.constexpr, RCP_ERR: tl.constexpr = 0):
    """x / (1 + exp(-x)) as torch computes it on CUDA (expf, IEEE division), bit for bit.

    The division is the fast path of CUDA's ``div.rn.f32`` (reciprocal approximation, one
    Newton step, Markstein's remainder correction: correctly rounded for normal operands and
    quotient) without its range check and slow-path call, made safe for every x instead:

    * the divisor is d/4 = fma(e, 0.25, 0.25), exact, at most 2**126: its reciprocal is
      never flushed (d reaches 2**128 for x near -88.7), and the quotient 4x/d is scaled
      back by 0.25, exactly (x/d is normal unless x is tiny, where d = 2 and 4x/d = 2x);
    * the remainder is taken as d q - x, so that x = -0.0 keeps its sign;
    * x > 20 (d = 1: y = x, also for +inf and where 4x overflows) and d = inf (x < -88.7:
      y = x * 0, -0.0 or NaN as torch's x / inf) are selected.

    ``RCP_ERR`` (tests only) moves the reciprocal approximation by that many ulps.
    About 9 instructions for the division instead of about 20 (with its slow-path plumbing).
    """
    e = exp(-x, PRECISE)
    d4 = tl.fma(e, 0.25, 0.25)  # (1 + e) / 4 rounded: the rounded 1 + e, over 4
    r = _rcp_approx(d4)
    if RCP_ERR != 0:
        r = (r.to(tl.int32, bitcast=True) + RCP_ERR).to(tl.float32, bitcast=True)
    r = tl.fma(r, tl.fma(-d4, r, 1.0), r)
    q = x * r
    q = tl.fma(-tl.fma(d4, q, -x), r, q)  # 4x/d rounded once
    y = tl.where(d4 == float("inf"), x * 0.0, q * 0.25)
    return tl.where(x > 20.0, x, y)


@triton.jit
def _erf_polys(x):
    """The two polynomials of erff's float32 algorithm at ``x`` (shared by `erf_fast` and
    `gelu_fast`): ``|x|``, whether ``|x|`` is in the large range, the small-range polynomial in
    ``x*x`` and the large-range one in ``|x|`` (immediate coefficients)."""
    a = tl.abs(x)
    big = a >= 1.002959966659546
    t2 = x * x
    rs = tl.fma(8.483494457323104e-05, t2, -0.0008213091641664505)
    rs = tl.fma(rs, t2, 0.005213488824665546)
    rs = tl.fma(rs, t2, -0.026868773624300957)
    rs = tl.fma(rs, t2, 0.11284004896879196)
    rs = tl.fma(rs, t2, -0.37612664699554443)
    rs = tl.fma(rs, t2, 0.12837915122509003)
    rl = tl.fma(0.00011219871521461755, a, -0.0013275252422317863)
    rl = tl.fma(rl, a, 0.00839653518050909)
    rl = tl.fma(rl, a, -0.04024658352136612)
    rl = tl.fma(rl, a, 0.15950430929660797)
    rl = tl.fma(rl, a, 0.9129176735877991)
    rl = tl.fma(rl, a, 0.6290600299835205)
    return a, big, rs, rl


@triton.jit
def erf_fast(x):
    """erf in float32 by the algorithm of CUDA's erff (libdevice ``__nv_erff``), restated.

    |x| < 1.00296: x + x * p(x*x); else sign(x) * (1 - 2**(-|x| - |x| * q(|x|))), p and q of
    degree 6 evaluated by fused multiply-adds in the same order as erff, so compiled results
    equal ``tl.erf``'s outside subnormal intermediates (erff flushes them to zero; GELU adds
    the result to 1, where they vanish). Both polynomials are evaluated with immediate
    coefficients and the result selected: about 21 instructions per element instead of 27
    (erff loads each coefficient pair by two predicated moves).
    """
    a, big, rs, rl = _erf_polys(x)
    s = tl.where(big, -a, x)
    r = tl.fma(tl.where(big, rl, rs), s, s)
    e = 1.0 - _ex2_approx(r)
    # 1 - e >= 0: copy x's sign bit
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    e = (e.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(big, e, r)


@triton.jit
def gelu_fast(x):
    """x * 0.5 * (1 + erf(x / sqrt(2))) as torch computes it on CUDA (float32, erff), bit for bit.

    Same polynomials, fused multiply-adds and 2**x as :func:`erf_fast` (CUDA's erff), with
    the sign handled once at the end, which changes no result:

    * w = |erf(z)| from |z| (erff's steps are odd in z: round-to-nearest is symmetric);
      the large branch's 2**(-|z| - |z| q) is the hardware 2**x of a negated operand.
    * 0.5 * (1 + erf(z)) = fma(copysign(0.5, z), w, 0.5): one rounding of the exact
      0.5 + 0.5 erf, i.e. half of the rounded 1 + erf (scaling by 2 is exact; 1 + erf is
      0 or at least 2**-24, far from the subnormals).
    * x * (0.5 (1 + erf)) = (0.5 x)(1 + erf) rounded once: equal unless 0.5 x is inexact,
      i.e. x a float32 subnormal with its last bit set (then within one ulp; bfloat16 and
      float16 inputs are never such).

    About 21 instructions per element (erf_fast plus torch's three GELU operations: 24).
    """
    z = x * 0.7071067811865476
    a, big, rs, rl = _erf_polys(z)
    # rn = -|erf(z)| (small |z|) or log2(1 - |erf(z)|): negated in the fma, for free
    rn = tl.fma(tl.where(big, rl, rs), -a, -a)
    wn = tl.where(big, _ex2_approx(rn) - 1.0, rn)  # -|erf(z)|
    half = ((z.to(tl.uint32, bitcast=True) & 0x80000000) | 0x3F000000).to(tl.float32, bitcast=True)
    return x * (0.5 - half * wn)


@triton.jit
def erf(x, PRECISE: tl.constexpr):
    """erf in float32: :func:`erf_fast` in compiled kernels, ``tl.erf`` in the interpreter."""
    if PRECISE:
        return erf_fast(x)
    else:
        return tl.erf(x)


@triton.jit
def exp(x, PRECISE: tl.constexpr):
    """exp in float32 (compiled ``tl.exp`` is the approximate ex2 instruction)."""
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def expm1(x, PRECISE: tl.constexpr):
    """exp(x) - 1 in float32, accurate near 0 (Kahan: (u - 1) * x / log(u), u = exp(x))."""
    if PRECISE:
        return libdevice.expm1(x)
    else:
        u = tl.exp(x)
        um1 = u - 1.0
        # u == 1: x is below half an ulp of 1, expm1(x) == x to float precision.
        safe = tl.where((u == 1.0) | (u == 0.0) | (um1 == float("inf")), 2.0, u)
        r = (safe - 1.0) * x / tl.log(safe)
        r = tl.where(u == 1.0, x, r)
        r = tl.where(u == 0.0, -1.0, r)
        return tl.where(um1 == float("inf"), um1, r)


@triton.jit
def log1p(x, PRECISE: tl.constexpr):
    """log(1 + x) in float32 for x >= -1, accurate near 0 (Kahan: log(w) * x / (w - 1))."""
    if PRECISE:
        return libdevice.log1p(x)
    else:
        w = 1.0 + x
        wm1 = w - 1.0
        ok = (w != 1.0) & (w != float("inf")) & (w != 0.0)
        safe_w = tl.where(ok, w, 2.0)
        safe_wm1 = tl.where(ok, wm1, 1.0)
        r = tl.log(safe_w) * (x / safe_wm1)
        r = tl.where(w == 1.0, x, r)
        return tl.where(ok | (w == 1.0), r, tl.log(w))


@triton.jit
def tanh(x, PRECISE: tl.constexpr):
    """tanh in float32: sign(x) * t / (t + 2) with t = expm1(2|x|); exactly +-1 for |x| > 10."""
    if PRECISE:
        return libdevice.tanh(x)
    else:
        a = tl.abs(x)
        t = expm1(tl.minimum(2.0 * a, 20.0), PRECISE)
        r = t / (t + 2.0)
        r = tl.where(a > 10.0, 1.0, r)
        return tl.where(x < 0.0, -r, r)


@triton.jit
def less_bit(t, x):
    """int32 1 where t < x, else 0 (0 when t or x is NaN), for float32 t never equal to x.

    The sign bit of t - x: the difference of two unequal floats is never zero (gradual
    underflow; no flush to zero here) and has the sign of their order, so no predicate is
    made (none to keep live, or to spill when the compiler hoists it). A NaN result on
    NVIDIA GPUs is the canonical 0x7FFFFFFF (sign 0). numpy, in the interpreter, propagates
    a NaN operand's sign (and makes -inf - -inf negative): there NaN operands give +0 first.
    """
    if _COMPILED:
        d = t - x
    else:
        d = tl.where((t == t) & (x == x), t - x, 0.0)
    return (d.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest-even in ``DTYPE``.

    bfloat16 is rounded by hand (the Triton interpreter truncates float32 -> bfloat16;
    compiled kernels round to nearest even, so both now agree): add 0x7FFF plus the lowest
    kept bit, drop the low 16 bits; values that round past the largest finite become inf.
    NaN becomes the quiet NaN 0x7FFF (what CUDA's conversion and torch on CUDA give) before
    the addition, which would otherwise carry a NaN's all-ones mantissa into the exponent
    and sign (0x7FFFFFFF -> -0.0). Compiled kernels use the hardware conversion, which
    gives the same bits (about 5 instructions per element fewer).
    """
    if DTYPE == tl.bfloat16 and _COMPILED:
        return x.to(tl.bfloat16)
    elif DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        u = tl.where(x != x, 0x7FFF0000, u)
        # bitcast the top half (a float conversion would flush bfloat16 subnormals in the
        # interpreter)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
