"""Per-group stochastic quantization in Triton, in the format of :mod:`fewbit.codecs.quantize`.

One pass each way. ``quantize`` reads x once: each program takes whole groups, finds their
min/max, rounds ``lo`` down (bfloat16, or float16 for float16 inputs) and ``scale`` up
(bfloat16), draws ``c = floor((x - lo) * inv + u)`` (``inv = 1 / scale`` rounded once per
group) and writes the packed codes and the 4 bytes of metadata per group. ``dequantize`` reads
the codes and metadata and writes ``lo + c * scale``. Same float32 operations as the torch
codec, so given the same uniform noise ``u`` (argument ``noise``) the packed bytes, lo and
scale are identical; the quantize kernel is compiled without floating-point contraction
(``enable_fp_fusion=False``: a fused multiply-add of ``(x - lo) * inv + u`` would round once
where the other paths round twice).

Noise by default: the codec's own counter hash, so for the same seed the kernel writes the same
bytes as the CPU paths. The 64-bit ``seed`` (a one-element int64 tensor on the device: no host
sync) gives a 32-bit key ``k = mix32(high ^ mix32(low))`` (computed in the kernel), and element
``e`` gets ``u = (mix32((e + k) mod 2**32) >> 8) * 2**-24``: about a dozen integer
instructions per element, exactly uniform on its 2**24-point grid for a uniform key, repeating
only for elements 2**32 apart in one tensor (see :func:`fewbit.codecs.quantize._uniform`).

Two quantize kernels. Rows made of whole groups of a power-of-two size (the usual case, e.g.
hidden sizes that are multiples of the group) take ``_quantize_whole_kernel``: no element masks,
each thread's elements lie in one group (a [chunks, groups, chunk] tile, 16-byte loads), and
NaN-propagating min/max mark non-finite groups with no extra pass (about 32 SASS instructions
per element for bf16 2-bit at group 256, sm_90, ``benchmarks/kernel_sass.py``). Other layouts
(partial last groups, sizes that are not powers of two) take ``_quantize_kernel``, the same
tile over the group padded to a power of two: masked-off positions load as NaN, which the
NaN-ignoring min/max skip, and one sum of ``x * 0`` finds non-finite elements (about 37).
Both write the same bytes for the same input and noise.

Layout restriction: every group must start at a multiple of 8 elements (a packed-byte
boundary): ``group_size % 8 == 0`` and, with several rows, ``row_len % 8 == 0``
(:func:`supports`). Bytes per element: quantize ``s + bits/8 + 4/group_size``,
dequantize ``bits/8 + 4/group_size + s`` (s = element size).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..codecs.bitpack import packed_nbytes
from ..codecs.quantize import (
    MAX_GROUP_SIZE,
    QuantizedTensor,
    check_group_size,
    check_quant_bits,
    draw_seed,
)
from .bitpack import byte_pad, pack_groups, unpack_groups
from .fmath import round_to
from .launch import FLOAT_DTYPES, NUM_WARPS, check_launchable, device_guard, interpreting

__all__ = ["dequantize", "quantize", "supports"]

_GPU_ELEMENTS = 4096  # elements per program (whole groups)
_INTERPRETER_ELEMENTS = 32768


@triton.jit
def _bf16_directed(v, UP: tl.constexpr):
    """float32 -> nearest bfloat16 value at or above (UP) / below v, returned as float32."""
    u = v.to(tl.uint32, bitcast=True)
    inexact = (u & 0xFFFF) != 0
    negative = (u >> 31) != 0
    if UP:
        away = inexact & ~negative
    else:
        away = inexact & negative
    r = tl.where(away, (u & 0xFFFF0000) + 0x10000, u & 0xFFFF0000)
    return tl.where(v != v, v, r.to(tl.float32, bitcast=True))


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) != float("inf"))


@triton.jit
def _mix32(h):
    """The codec's 32-bit hash (:func:`fewbit.codecs.quantize._mix32`) on uint32 values:
    xor-shift-multiply with the "lowbias32" constants, wrapping modulo 2**32."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _seed_key(seed):
    """32-bit noise key of a 62-bit int64 seed, as :func:`fewbit.codecs.quantize._seed_key`:
    ``mix32(high ^ mix32(low))`` of its two 32-bit halves."""
    low = (seed & 0xFFFFFFFF).to(tl.uint32)
    high = (seed >> 32).to(tl.uint32)
    return _mix32(high ^ _mix32(low))


@triton.jit
def _min_nan(a, b):
    """Minimum that propagates NaN (PTX min.NaN.f32, numpy's minimum in the interpreter)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_nan(a, b):
    """Maximum that propagates NaN (PTX max.NaN.f32, numpy's maximum in the interpreter)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _hash_grid(start, COLS: tl.constexpr):
    """``mix32(e + key) >> 8`` as float32 (an integer below 2**24, exact) for elements ``e =
    base[r] + [0, COLS)`` given ``start[r] = (base[r] + key) mod 2**32`` (uint32 [ROWS]); the
    noise is this times ``2**-24`` (the codec's counter hash)."""
    h = _mix32(start[:, None] + tl.arange(0, COLS).to(tl.uint32)[None, :])
    return (h >> 8).to(tl.float32)


@triton.jit
def _tile(
    pid, n_groups, groups_per_row, row_len, G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr
):
    """Group ids [NG], element index [NG, GP] and validity of a program's tile."""
    gi = pid * NG + tl.arange(0, NG)
    row = gi // groups_per_row
    col0 = (gi % groups_per_row) * G
    j = tl.arange(0, GP)
    elem = (row * row_len + col0)[:, None] + j[None, :]
    valid = (j[None, :] < G) & ((col0[:, None] + j[None, :]) < row_len) & (gi < n_groups)[:, None]
    return gi, elem, valid


@triton.jit
def _byte_groups(
    gi, gmask, groups_per_row, row_len,
    BITS: tl.constexpr, P: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr,
):  # fmt: skip
    """Packed-byte offsets [NG * GP // 8, P] and validity [NG * GP // 8] of the tile's runs of
    8 codes: a tile row's GP codes are GP // 8 consecutive runs, the first starting at a
    multiple of 8 elements (the layout restriction), so offsets follow from the group's start
    (no reductions over index tiles)."""
    row = gi // groups_per_row
    col0 = (gi % groups_per_row) * G
    j8 = tl.arange(0, GP // 8)
    ok8 = (j8[None, :] * 8 < G) & (col0[:, None] + j8[None, :] * 8 < row_len) & gmask[:, None]
    run = ((row * row_len + col0) // 8)[:, None] + j8[None, :]
    k = tl.arange(0, P)
    offs = tl.reshape(run, (NG * GP // 8,))[:, None] * BITS + k[None, :]
    return offs, tl.reshape(ok8, (NG * GP // 8,))


@triton.jit
def _group_params(mn, mx, nonfinite, LO_FP16: tl.constexpr, BITS: tl.constexpr):
    """Per group: (lo, scale) as stored (NaN for bad groups), and (lo, inv) for the codes
    (0 and 1 for bad groups). ``mn`` / ``mx`` / ``nonfinite`` have the group's shape."""
    levels: tl.constexpr = (1 << BITS) - 1
    if LO_FP16:  # float16 input: the minimum is a float16 value already
        lo = mn
    else:
        lo = _bf16_directed(mn, False)
    step = (tl.math.div_rn(mx, levels * 1.0) - tl.math.div_rn(lo, levels * 1.0)) * (1.0 + 2.0**-20)
    step = tl.where(step > 0, tl.maximum(step, 2.0**-126), step)  # 1 / scale stays finite
    scale = _bf16_directed(step, True)
    bad = nonfinite | ~_finite(lo) | ~_finite(scale)
    lo_out = tl.where(bad, float("nan"), lo)
    scale_out = tl.where(bad, float("nan"), scale)
    scale = tl.where(bad, 0.0, scale)
    inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))  # per group, correctly rounded
    return lo_out, scale_out, tl.where(bad, 0.0, lo), inv


@triton.jit
def _codes(x, lo, inv, u, HASHED: tl.constexpr, BITS: tl.constexpr):
    """int32 codes ``clamp(floor((x - lo) * inv + u), 0, L)``; ``u`` is the noise, or with
    HASHED the hash grid (u = grid * 2**-24)."""
    levels: tl.constexpr = (1 << BITS) - 1
    # NaN quotients (masked-off positions, NaN in bad groups) give code 0 through the clamp:
    # tl.maximum ignores NaN (PTX max.f32, numpy's fmax in the interpreter)
    v = (x - lo) * inv
    if HASHED:
        # v + grid * 2**-24 as one fused multiply-add: the product is exact, so this is the
        # rounded sum v + u of the other paths
        t = tl.fma(u, 5.9604644775390625e-08, v)
    else:
        t = v + u
    # clamp(floor(t), 0, L) == trunc(clamp(t, 0, L)): 0 and L are integers, and truncation
    # is floor for t >= 0; a NaN t clamps to 0
    return tl.minimum(tl.maximum(t, 0.0), levels * 1.0).to(tl.int32)


@triton.jit
def _group_codes(
    x, mn, mx, nonfinite, gi, gmask, base, within, valid, lo_ptr, scale_ptr, noise_ptr,
    seed_ptr, LO_FP16: tl.constexpr, HAS_NOISE: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    """Both quantize kernels' middle: store the groups' lo and scale (from their min, max and
    non-finite flags), draw the noise (the hash of each element's index, or the given noise
    tensor) and return the int32 codes of the [A, NG, C] tile ``x``."""
    lo_out, scale_out, lo, inv = _group_params(mn, mx, nonfinite, LO_FP16, BITS)
    tl.store(lo_ptr + gi, lo_out.to(lo_ptr.dtype.element_ty), mask=gmask)
    tl.store(scale_ptr + gi, scale_out.to(tl.bfloat16), mask=gmask)
    elem = base[None, :, None] + within
    if HAS_NOISE:
        u = tl.load(noise_ptr + elem, mask=valid, other=0.0)
    else:
        start = base.to(tl.uint32) + _seed_key(tl.load(seed_ptr))
        u = (_mix32(start[None, :, None] + within.to(tl.uint32)) >> 8).to(tl.float32)
    return _codes(x, lo[None, :, None], inv[None, :, None], u, not HAS_NOISE, BITS)


@triton.jit
def _quantize_kernel(
    x_ptr, noise_ptr, packed_ptr, lo_ptr, scale_ptr,
    n_groups, groups_per_row, row_len, nbytes, seed_ptr,
    BITS: tl.constexpr, P: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr,
    A: tl.constexpr, LO_FP16: tl.constexpr, HAS_NOISE: tl.constexpr,
):  # fmt: skip
    """Any layout (partial groups, G padded to GP): the tile of ``_quantize_whole_kernel``
    over GP; masked-off positions load as NaN, which min/max ignore, and one sum of x * 0
    finds a non-finite element."""
    C: tl.constexpr = GP // A
    # group indices in int32 (n_groups < 2**31: 32-bit division), element indices in int64
    gi = tl.program_id(0) * NG + tl.arange(0, NG)
    row = gi // groups_per_row
    col0 = (gi % groups_per_row).to(tl.int64) * G  # int64: a row may pass 2**31 elements
    base = row.to(tl.int64) * row_len + col0  # each group's first element
    size = tl.minimum(row_len - col0, G).to(tl.int32)  # the group's length
    within = tl.arange(0, A)[:, None, None] * C + tl.arange(0, C)[None, None, :]  # [A, 1, C]
    elem = base[None, :, None] + within
    gmask = gi < n_groups
    valid = (within < size[None, :, None]) & gmask[None, :, None]
    # min and max ignore NaN (PTX min/max, numpy's nanmin in the interpreter)
    x = tl.load(x_ptr + elem, mask=valid, other=float("nan")).to(tl.float32)
    mn = tl.min(tl.min(x, axis=0), axis=1)  # in-thread axis first
    mx = tl.max(tl.max(x, axis=0), axis=1)
    # x * 0 is NaN exactly for inf and NaN: one sum finds a non-finite element of the group
    nonfinite = tl.sum(tl.sum(tl.where(valid, x, 0.0) * 0.0, axis=0), axis=1) != 0.0
    code = _group_codes(x, mn, mx, nonfinite, gi, gmask, base, within, valid, lo_ptr, scale_ptr,
                        noise_ptr, seed_ptr, LO_FP16, HAS_NOISE, BITS)  # fmt: skip
    # runs of 8 codes (a group starts on a packed byte: the layout restriction); run (a, g, r)
    # holds elements a * C + 8r .. + 7 of group g
    k = tl.arange(0, P)
    first8 = tl.arange(0, A)[:, None, None] * (C // 8) + tl.arange(0, C // 8)[None, None, :]
    run = (base // 8)[None, :, None] + first8
    ok8 = (first8 * 8 < size[None, :, None]) & gmask[None, :, None]
    offs = tl.reshape(run, (A * NG * C // 8,))[:, None] * BITS + k[None, :]
    ok8 = tl.reshape(ok8, (A * NG * C // 8,))
    code8 = tl.reshape(code, (A * NG * C // 8, 8))
    mask = ok8[:, None] & (k[None, :] < BITS) & (offs < nbytes)
    tl.store(packed_ptr + offs, pack_groups(code8, BITS, P).to(tl.uint8), mask=mask)


@triton.jit
def _quantize_whole_kernel(
    x_ptr, noise_ptr, packed_ptr, lo_ptr, scale_ptr,
    n_groups, groups_per_row, row_len, nbytes, seed_ptr,
    BITS: tl.constexpr, P: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, A: tl.constexpr,
    LO_FP16: tl.constexpr, HAS_NOISE: tl.constexpr,
):  # fmt: skip
    """Rows of whole groups, G a power of two (:func:`_whole`): no element masks. The tile is
    [A, NG, G // A] (element (a, g, c) is element a * (G // A) + c of group g), so a thread's
    elements lie in one group and the per-group work is shared by fewer elements' threads.
    NaN-propagating min/max find non-finite groups: no extra pass."""
    C: tl.constexpr = G // A
    gi = tl.program_id(0) * NG + tl.arange(0, NG)
    row = gi // groups_per_row
    col0 = (gi % groups_per_row).to(tl.int64) * G  # int64: a row may pass 2**31 elements
    base = row.to(tl.int64) * row_len + col0  # each group's first element
    within = tl.arange(0, A)[:, None, None] * C + tl.arange(0, C)[None, None, :]  # [A, 1, C]
    elem = base[None, :, None] + within
    gmask = gi < n_groups
    valid = tl.broadcast_to(gmask[None, :, None], (A, NG, C))
    x = tl.load(x_ptr + elem, mask=valid, other=0.0).to(tl.float32)
    # a NaN anywhere makes both NaN, an infinity makes one infinite: a bad group below
    mn = tl.reduce(tl.reduce(x, 0, _min_nan), 1, _min_nan)  # in-thread axis first
    mx = tl.reduce(tl.reduce(x, 0, _max_nan), 1, _max_nan)
    code = _group_codes(x, mn, mx, gi < 0, gi, gmask, base, within, valid, lo_ptr, scale_ptr,
                        noise_ptr, seed_ptr, LO_FP16, HAS_NOISE, BITS)  # fmt: skip
    # runs of 8 codes; run (a, g, r) holds elements a * C + 8r .. + 7 of group g
    k = tl.arange(0, P)
    run = (
        (base // 8)[None, :, None]
        + tl.arange(0, A)[:, None, None] * (C // 8)
        + tl.arange(0, C // 8)[None, None, :]
    )
    offs = tl.reshape(run, (A * NG * C // 8,))[:, None] * BITS + k[None, :]
    ok8 = tl.reshape(tl.broadcast_to(gmask[None, :, None], (A, NG, C // 8)), (A * NG * C // 8,))
    code8 = tl.reshape(code, (A * NG * C // 8, 8))
    mask = ok8[:, None] & (k[None, :] < BITS)
    tl.store(packed_ptr + offs, pack_groups(code8, BITS, P).to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_kernel(
    packed_ptr, lo_ptr, scale_ptr, out_ptr,
    n_groups, groups_per_row, row_len, nbytes,
    BITS: tl.constexpr, P: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, GP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    gi, elem, valid = _tile(pid, n_groups, groups_per_row, row_len, G, NG, GP)
    gmask = gi < n_groups
    offs, ok8 = _byte_groups(gi, gmask, groups_per_row, row_len, BITS, P, G, NG, GP)
    k = tl.arange(0, P)
    byte = tl.load(
        packed_ptr + offs, mask=ok8[:, None] & (k[None, :] < BITS) & (offs < nbytes), other=0
    )
    code = tl.reshape(unpack_groups(byte, BITS, P), (NG, GP)).to(tl.float32)
    lo = tl.load(lo_ptr + gi, mask=gmask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + gi, mask=gmask, other=0.0).to(tl.float32)
    out = lo[:, None] + code * scale[:, None]  # code * scale is exact (8 + 8 bits)
    tl.store(out_ptr + elem, round_to(out, out_ptr.dtype.element_ty), mask=valid)


def _layout(shape: Sequence[int], group_size: int, per_sample: bool) -> tuple[int, int, int]:
    """(rows, row_len, groups_per_row) as in fewbit.codecs.quantize."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if numel == 0:
        return 0, 0, 0
    rows = int(shape[0]) if per_sample and len(shape) >= 2 else 1
    row_len = numel // rows
    return rows, row_len, -(-row_len // group_size)


def supports(shape: Sequence[int], group_size: int, per_sample: bool = True) -> bool:
    """True when every group starts on a packed-byte boundary (see the module docstring)."""
    rows, row_len, _ = _layout(shape, group_size, per_sample)
    aligned = group_size % 8 == 0 and (rows <= 1 or row_len % 8 == 0)
    return aligned and group_size <= MAX_GROUP_SIZE


def _whole(row_len: int, group_size: int) -> bool:
    """True when rows are whole groups of a power-of-two size (``_quantize_whole_kernel``)."""
    return row_len % group_size == 0 and group_size == triton.next_power_of_2(group_size)


def _chunks(group_size: int, itemsize: int) -> int:
    """A of ``_quantize_whole_kernel`` (on a GPU): a thread loads 16 bytes per chunk, a group
    spreads over ``group_size // 32`` threads (at least one), so a program's 128 threads hold
    about 32 elements each, of one group (for group_size >= 32); chunks of at least 8."""
    threads = max(1, group_size // 32)
    chunk = min(group_size, max(8, threads * (16 // itemsize)))
    return group_size // chunk


def _config(group_size: int) -> tuple[int, int]:
    """(GP, NG): the group padded to a power of two, groups per program."""
    gp = max(8, triton.next_power_of_2(group_size))
    per_program = _INTERPRETER_ELEMENTS if interpreting() else _GPU_ELEMENTS
    return gp, max(1, per_program // gp)


def _seed_tensor(
    seed: int | Tensor | None, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """The seed as a one-element int64 tensor on ``device`` (drawn when None)."""
    if seed is None:
        seed = draw_seed(generator, device)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed must be a one-element int64 tensor, got {seed.dtype}")
        return seed.reshape(1).to(device, non_blocking=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return torch.tensor([seed], dtype=torch.int64).to(device, non_blocking=True)


def quantize(
    x: Tensor,
    bits: int,
    group_size: int = 256,
    *,
    per_sample: bool = True,
    seed: int | Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> QuantizedTensor:
    """Triton version of :func:`fewbit.codecs.quantize.quantize` (same format).

    Noise: ``noise`` (float32 in [0, 1), one per element in row-major order) if given, else
    the codec's counter hash keyed by ``seed`` (the same bytes as the CPU paths; an int or a
    one-element int64 tensor, read on the device; drawn by
    :func:`fewbit.codecs.quantize.draw_seed` from ``generator`` or the global RNG of ``x``'s
    device when None). Stores ``ceil(numel*bits/8) + 4*n_groups`` bytes.
    """
    if not isinstance(x, Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError("x must be a float32, float16 or bfloat16 tensor for the kernel")
    check_quant_bits(bits)
    check_group_size(group_size)
    check_launchable(x, "x")
    if not supports(x.shape, group_size, per_sample):
        raise ValueError(
            f"group_size={group_size} with shape {tuple(x.shape)}: groups must start at multiples "
            "of 8 elements for the kernel; use fewbit.codecs.quantize"
        )
    rows, row_len, gpr = _layout(x.shape, group_size, per_sample)
    n_groups = rows * gpr
    flat = x.detach().reshape(-1).contiguous()
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    lo_dtype = torch.float16 if x.dtype == torch.float16 else torch.bfloat16
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    lo = torch.empty(n_groups, dtype=lo_dtype, device=x.device)
    scale = torch.empty(n_groups, dtype=torch.bfloat16, device=x.device)
    if noise is not None:
        if noise.numel() != n:
            raise ValueError(f"noise must have {n} elements, got {noise.numel()}")
        noise = noise.detach().reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()
        seed_t = torch.zeros(1, dtype=torch.int64, device=x.device)  # unused
    else:
        seed_t = _seed_tensor(seed, generator, x.device)
    if n_groups:
        gp, ng = _config(group_size)
        args = (flat, noise if noise is not None else flat, packed, lo, scale,
                n_groups, gpr, row_len, nbytes, seed_t)  # fmt: skip
        common = dict(BITS=bits, P=byte_pad(bits), G=group_size, NG=ng,
                      LO_FP16=lo_dtype == torch.float16, HAS_NOISE=noise is not None,
                      num_warps=NUM_WARPS, enable_fp_fusion=False)  # fmt: skip
        grid = (triton.cdiv(n_groups, ng),)
        with device_guard(x):
            if _whole(row_len, group_size):
                _quantize_whole_kernel[grid](
                    *args, A=_chunks(group_size, x.element_size()), **common
                )
            else:
                _quantize_kernel[grid](*args, GP=gp, A=_chunks(gp, x.element_size()), **common)
    return QuantizedTensor(packed, lo, scale, x.shape, x.dtype, bits, group_size, per_sample)


def dequantize(q: QuantizedTensor) -> Tensor:
    """Triton version of :func:`fewbit.codecs.quantize.dequantize`: ``lo + code * scale``."""
    check_launchable(q.packed, "q.packed")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the kernel dequantizes to float32/float16/bfloat16, not {q.dtype}")
    if not supports(q.shape, q.group_size, q.per_sample):
        raise ValueError("unsupported layout for the kernel; use fewbit.codecs.quantize")
    rows, row_len, gpr = _layout(q.shape, q.group_size, q.per_sample)
    n_groups = rows * gpr
    out = torch.empty(rows * row_len, dtype=q.dtype, device=q.packed.device)
    if n_groups:
        gp, ng = _config(q.group_size)
        with device_guard(out):
            _dequantize_kernel[(triton.cdiv(n_groups, ng),)](
                q.packed, q.lo, q.scale, out, n_groups, gpr, row_len, q.packed.numel(),
                BITS=q.bits, P=byte_pad(q.bits), G=q.group_size, NG=ng, GP=gp,
                num_warps=NUM_WARPS,
            )  # fmt: skip
    return out.reshape(q.shape)
