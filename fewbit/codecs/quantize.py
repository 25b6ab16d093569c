"""Per-group stochastic k-bit quantization of a tensor (the ActNN/GACT codec).

Layout
------
With ``per_sample=True`` and ``x.ndim >= 2`` the tensor is viewed as ``rows = x.shape[0]``
rows of ``row_len = x[0].numel()`` elements (one row per sample), otherwise as one row of
``x.numel()`` elements. Each row is cut into ``ceil(row_len / group_size)`` groups of
``group_size`` consecutive elements (the last group of a row may be shorter: rows are
conceptually padded, but padding is never stored), so no group spans two samples and one
outlier sample cannot ruin the range of another.

Each group ``g`` stores ``lo[g]`` (16-bit, rounded *down*: ``lo <= min``) and ``scale[g]``
(bfloat16, rounded *up* so ``lo + (2**bits - 1) * scale >= max``; a positive scale is at least
``2**-126``, the smallest normal float32, so that its reciprocal is finite), and every element
stores a ``bits``-bit code ``c = floor((x - lo) * inv + u)``, ``u ~ U[0, 1)``, clamped to
``[0, 2**bits - 1]`` and bit-packed with :mod:`fewbit.codecs.bitpack` in row-major order, where
``inv = 1 / scale`` rounded to float32 once per group (1 for a zero scale): one multiplication
per element instead of a division, in every path. Dequantization is ``lo + c * scale``. Given
the stored ``lo``/``scale`` the rounding is unbiased: ``E[c] = (x - lo) * inv`` and
``inv * scale = 1`` within ``2**-24``, so ``E[dequantize(quantize(x))] = x`` up to float32
arithmetic (a relative ``2**-23`` of ``x - lo``) and the final cast to ``x.dtype``; the error
of one draw is below ``scale`` per element, its variance at most ``scale**2 / 4``.

Cost: ``ceil(numel * bits / 8)`` bytes of codes plus 4 bytes per group, i.e.
``32 / group_size`` extra bits per element (0.125 at the default ``group_size=256``).

``lo`` is stored as float16 for float16 inputs (so every input value, in particular a
constant group, is represented exactly) and as bfloat16 otherwise (the float32 exponent
range; a float32 constant that is not a bfloat16 value therefore comes back unbiased but not
exact, within ``scale`` <= one bfloat16 ulp of it; zeros and bfloat16-representable constants
are exact).

Non-finite input: a group that contains NaN or +-inf (or whose range overflows float32,
e.g. float64 values beyond the float32 range) dequantizes to all-NaN, so the problem
propagates to the gradient instead of being silently replaced by finite numbers. Other groups
are unaffected.

Paths (one format, interchangeable: each path dequantizes the others' output)
------------------------------------------------------------------------------
* CUDA, when :func:`fewbit.kernels.use_kernel` says so and the layout allows it
  (:func:`fewbit.kernels.quantize.supports`): the Triton kernels, one pass each way; the
  same noise as below (same seed, same bytes).
* CPU, float16/bfloat16/float32/float64: the native C passes (:mod:`fewbit.codecs.native`,
  compiled at first use; ``FEWBIT_NATIVE=0`` or ``FEWBIT_COMPILE=0`` or no C compiler: the
  torch path below), one pass per direction over each group, no transient memory beyond the
  outputs, groups split across torch's OpenMP threads when the library is built with OpenMP
  (results independent of the thread count). Same bytes and bitwise the same dequantized
  values as the torch path, with one exception: a group whose minimum (or maximum) is both
  +0.0 and -0.0 may store the other zero in ``lo`` (or ``scale``), as torch's own vectorized
  ``amin``/``amax`` pick by lane order; its dequantized values are equal as numbers (a
  zero's sign may differ).
* Otherwise PyTorch ops. On the CPU, tensors of at least ``_FUSED_MIN`` elements whose rows
  are whole groups go through the fused codec (:mod:`fewbit.codecs.fused`: compiled at first
  use, ``FEWBIT_COMPILE=0`` for eager), the rest through eager blocks of ``_CHUNK`` elements;
  both give the same bytes. Noise: ``u = mix32((e + key) mod 2**32) / 2**24`` for element
  ``e``, ``key`` a 32-bit hash of the seed (:func:`_uniform`); it repeats only for elements
  2**32 apart in one tensor.
* The seed (:func:`draw_seed`) is a one-element int64 tensor drawn on the device (or the
  generator's device): no host sync. ``quantize``/``dequantize`` are the custom ops
  ``fewbit::quantize``/``fewbit::dequantize`` with fake implementations, so they trace under
  ``torch.compile`` (``fullgraph=True``) and run on meta tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import native
from .bitpack import packed_nbytes
from .counter_hash import MIX1, MIX2, Word, mix32
from .fused import compile_enabled, fused
from .protocol import Encoded, restride, saved_stride

__all__ = [
    "GroupQuantizer",
    "MAX_GROUP_SIZE",
    "QuantizedTensor",
    "check_quant_bits",
    "check_group_size",
    "dequantize",
    "dequantize_parts",
    "draw_seed",
    "quantize",
    "quantize_parts",
    "quantized_nbytes",
]

QUANT_BITS = (1, 2, 4, 8)
# Largest group: one group fills one Triton program (GPU kernels at larger sizes take minutes
# to compile and spill registers), and a group's 4 bytes of metadata are already < 0.01 bit
# per element at this size.
MAX_GROUP_SIZE = 4096
META_BYTES_PER_GROUP = 4  # 16-bit lo + 16-bit scale
# Elements processed at once: bounds the float32 transients (about three 4-MiB blocks).
_CHUNK = 1 << 20
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NAN_BITS = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}  # canonical quiet NaNs
_MIN_STEP = 2.0**-126  # smallest positive scale: the smallest normal float32 (a bfloat16)


@dataclass
class QuantizedTensor(Encoded):
    """A tensor quantized by :func:`quantize` (an :class:`~fewbit.codecs.protocol.Encoded`).

    Keeps ``packed``, ``lo`` and ``scale``: ``nbytes()`` (=
    ``quantized_nbytes(shape, bits, group_size, per_sample)``) bytes. ``decode()`` is
    :func:`dequantize`; ``stride`` (None: contiguous) is the layout ``decode`` restores.
    """

    packed: Tensor  # uint8 codes, bitpack layout, numel codes in row-major order
    lo: Tensor  # (n_groups,) float16 or bfloat16, rounded down
    scale: Tensor  # (n_groups,) bfloat16, rounded up
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    group_size: int
    per_sample: bool = True
    stride: tuple[int, ...] | None = None

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.packed, self.lo, self.scale)

    def with_tensors(self, tensors: Sequence[Tensor]) -> QuantizedTensor:
        packed, lo, scale = tensors
        return replace(self, packed=packed, lo=lo, scale=scale)

    def decode(self) -> Tensor:
        return dequantize(self)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        """Copy of the stored tensors on ``device`` (same metadata)."""
        out = super().to(device, non_blocking)
        assert isinstance(out, QuantizedTensor)
        return out


@dataclass(frozen=True)
class GroupQuantizer:
    """Codec: :func:`quantize` with these settings; ``encode(t) -> QuantizedTensor``.

    Stores ``quantized_nbytes(t.shape, bits, group_size, per_sample)`` bytes. ``generator``
    is used only for tensors on its device type (else the global RNG of the tensor's device).
    """

    bits: int = 2
    group_size: int = 256
    per_sample: bool = True
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        check_quant_bits(self.bits)
        check_group_size(self.group_size)

    def encode(self, t: Tensor) -> QuantizedTensor:
        gen = self.generator
        if gen is not None and isinstance(t, Tensor) and gen.device.type != t.device.type:
            gen = None
        return quantize(t, self.bits, self.group_size, generator=gen, per_sample=self.per_sample)


def check_quant_bits(bits: int, name: str = "bits") -> int:
    """Validate a quantizer bit width (one of 1, 2, 4, 8) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in {QUANT_BITS}, got {bits!r}")
    if bits not in QUANT_BITS:
        raise ValueError(f"{name} must be one of {QUANT_BITS}, got {bits}")
    return bits


def check_group_size(group_size: int, name: str = "group_size") -> int:
    """Validate a group size (int in ``[1, MAX_GROUP_SIZE]``) and return it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name} must be an int in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"{name} must be in [1, {MAX_GROUP_SIZE}], got {group_size}")
    return group_size


def _rows(shape: Sequence[Any], per_sample: bool) -> tuple[Any, Any]:
    """(rows, row_len) of the grouping layout described in the module docstring.

    Works on ints and on the symbolic sizes of fake tensors (torch.compile).
    """
    numel = 1
    for s in shape:
        numel = numel * s
    if per_sample and len(shape) >= 2 and numel > 0:
        return shape[0], numel // shape[0]
    return (1, numel) if numel > 0 else (0, 0)


def quantized_nbytes(
    shape: Sequence[int], bits: int, group_size: int = 256, per_sample: bool = True
) -> int:
    """Bytes :func:`quantize` stores for a tensor of ``shape``.

    ``ceil(numel * bits / 8) + 4 * rows * ceil(row_len / group_size)``.
    """
    check_quant_bits(bits)
    check_group_size(group_size)
    rows, row_len = _rows(tuple(int(s) for s in shape), per_sample)
    n_groups = rows * (-(-row_len // group_size))
    return packed_nbytes(rows * row_len, bits) + META_BYTES_PER_GROUP * n_groups


def _lo_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def _bf16_directed(v: Tensor, up: bool) -> Tensor:
    """Nearest bfloat16 value at or above (``up``) / at or below ``v`` (float32), as
    bfloat16; NaN stays NaN. Integer ops on the float's bits: exact under any compiler
    (a compiler may drop a float32 -> bfloat16 -> float32 round trip, not these)."""
    u = v.view(torch.int32)
    inexact = (u & 0xFFFF) != 0
    away = inexact & ((u >= 0) if up else (u < 0))  # away from zero = the requested side
    r = (u & -65536) + torch.where(away, 0x10000, 0).to(torch.int32)
    return torch.where(v != v, v, r.view(torch.float32)).to(torch.bfloat16)


def _round_down(v: Tensor, dtype: torch.dtype) -> Tensor:
    """Largest ``dtype`` value <= ``v`` (float32 in; float16 only for values that are
    float16 already, the minima of float16 inputs), elementwise; NaN stays NaN."""
    return v.to(dtype) if dtype == torch.float16 else _bf16_directed(v, up=False)


def _round_up(v: Tensor, dtype: torch.dtype) -> Tensor:
    """Smallest bfloat16 value >= ``v`` (float32 in), elementwise; NaN stays NaN."""
    assert dtype == torch.bfloat16
    return _bf16_directed(v, up=True)


def _blocks(rows: int, row_len: int, group_size: int) -> list[tuple[int, int, int, int]]:
    """Work items ``(row0, row1, col0, col1)`` of about ``_CHUNK`` elements.

    Either several whole rows (``col0 == 0, col1 == row_len``) or a group-aligned slice of
    one row. Both map to a contiguous range of elements and of groups.
    """
    padded_len = -(-row_len // group_size) * group_size
    if rows == 0 or row_len == 0:
        return []
    if padded_len <= _CHUNK:
        step = max(1, _CHUNK // padded_len)
        return [(r, min(r + step, rows), 0, row_len) for r in range(0, rows, step)]
    span = max(1, _CHUNK // group_size) * group_size
    return [
        (r, r + 1, c, min(c + span, row_len)) for r in range(rows) for c in range(0, row_len, span)
    ]


def _grouped(flat: Tensor, nrows: int, ncols: int, group_size: int) -> Tensor:
    """float32 ``(nrows * ceil(ncols / G), G)`` view of ``nrows x ncols`` elements.

    Padding repeats the last element of each row, so it never changes a group's min/max.
    """
    x = flat.reshape(nrows, ncols).float()
    pad = -ncols % group_size
    if pad:
        x = torch.cat([x, x[:, -1:].expand(nrows, pad)], dim=1)
    return x.reshape(-1, group_size)


# ----------------------------------------------------------------------------- noise
_M32 = 0xFFFFFFFF
_SEED_HIGH = 2**62


def draw_seed(generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """A fresh seed: one-element int64 tensor in ``[0, 2**62)`` on ``device``.

    Drawn from ``generator`` on the generator's own device (the global RNG is then
    untouched), else from the global RNG of ``device``. No host synchronisation.
    """
    if generator is None:
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
    seed = torch.randint(
        0, _SEED_HIGH, (1,), dtype=torch.int64, generator=generator, device=generator.device
    )
    return seed.to(device, non_blocking=True)


_MIX1 = MIX1
_MIX2 = MIX2 - 2**32  # as int32


def _mix32(h: Tensor) -> Tensor:
    """A bijective hash of 32-bit words held in int32 (xor-shift-multiply, "lowbias32"
    constants; multiplications wrap modulo 2**32, shifts are made logical by masking)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _MIX1
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * _MIX2
    return h ^ ((h >> 16) & 0xFFFF)


def _seed_key(seed: Word) -> Word:
    """32-bit noise key (in ``[0, 2**32)``) of a 62-bit seed: an int64 tensor (no sync), or
    a Python int (the native path reads a CPU seed once; a dozen one-element tensor
    operations cost about 50 us per call)."""
    return mix32(((seed >> 32) ^ mix32(seed & _M32)) & _M32)


def _block_key(key: Tensor, e0: int) -> Tensor:
    """Key of the block starting at element ``e0``: ``(key + e0) mod 2**32`` as int32."""
    k = (key + (e0 & _M32)) & _M32
    return (k - ((k >> 31) << 32)).to(torch.int32)


def _uniform(key: Tensor, nrows: int, ncols: int, width: int, device: torch.device) -> Tensor:
    """Noise of a block: ``(nrows, width)`` float32 values in ``[0, 1)``, 24 random bits each.

    Position ``(r, j)`` holds the noise of the block's element ``r * ncols + j`` (columns
    ``j >= ncols`` are padding, any value): ``mix32((e + key) mod 2**32) >> 8`` scaled by
    ``2**-24``, ``e`` the element's index in the tensor (``key`` already includes the block's
    first index). For a uniform key every element's noise is exactly uniform on that grid
    (mix32 is a bijection), distinct elements below 2**32 apart get distinct hash inputs, and
    the noise of an element does not depend on how the tensor is cut into blocks.
    """
    j = torch.arange(width, dtype=torch.int32, device=device)
    r = torch.arange(nrows, dtype=torch.int32, device=device) * ncols
    h = _mix32((r.unsqueeze(1) + j) + key)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24


def _pack_pow2(codes: Tensor, bits: int) -> Tensor:
    """Codes (uint8, 1-D, values below ``2**bits``, bits in {1, 2, 4, 8}) packed in the
    :mod:`~fewbit.codecs.bitpack` layout: byte ``j`` holds codes ``j*p .. j*p+p-1``
    (``p = 8 // bits``), code ``k`` of them at bit ``k * bits``. ``p - 1`` eager passes over
    ``n / p`` bytes."""
    per = 8 // bits
    n = codes.numel()
    c = torch.nn.functional.pad(codes, (0, -n % per)).view(-1, per)
    acc = c[:, 0].clone()
    for k in range(1, per):
        acc |= c[:, k] << (k * bits)
    return acc


def _unpack_pow2(b: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`_pack_pow2`: the first ``n`` codes of packed bytes ``b`` (uint8)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    codes = torch.stack([(b >> (k * bits)) & mask for k in range(per)], dim=1)
    return codes.reshape(-1)[:n]


# ----------------------------------------------------------------------------- torch path
def _quantize_block(
    g: Tensor, bits: int, lo_dtype: torch.dtype, noise: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (uint8, same shape as ``g``), lo and scale for float32 groups ``g``, with the
    rounding noise ``noise`` (``g``'s numel values in [0, 1)); None: no noise, codes round
    down (for callers that only want lo and scale, such as the GPU reference check)."""
    levels = (1 << bits) - 1
    mn = g.amin(dim=1)
    mx = g.amax(dim=1)
    lo = _round_down(mn, lo_dtype)
    lo32 = lo.float()
    # mx/levels - lo/levels cannot overflow where mx - lo would; the extra factor gives a
    # margin against float32 rounding so lo + levels * scale >= max holds after rounding.
    step = (mx / levels - lo32 / levels) * (1.0 + 2.0**-20)
    # a positive step is at least the smallest normal float32: 1 / scale stays finite
    step = torch.where(step > 0, torch.clamp_min(step, _MIN_STEP), step)
    scale = _round_up(step, torch.bfloat16)
    scale32 = scale.float()
    # Non-finite groups store NaN; unconditional (no host sync on GPU).
    bad = ~(torch.isfinite(lo32) & torch.isfinite(scale32))
    # the quiet NaN with a clear sign bit, set through the bits: identical under compilers
    lo = torch.where(bad, _NAN_BITS[lo_dtype], lo.view(torch.int16)).view(lo_dtype)
    scale = torch.where(bad, _NAN_BITS[torch.bfloat16], scale.view(torch.int16))
    scale = scale.view(torch.bfloat16)
    lo32 = torch.where(bad, 0.0, lo32)
    scale32 = torch.where(bad, 0.0, scale32)
    inv = 1.0 / torch.where(scale32 > 0, scale32, 1.0)  # float32, correctly rounded
    v = (g - lo32.unsqueeze(1)) * inv.unsqueeze(1)
    v = torch.nan_to_num(v, nan=0.0)  # NaN groups: any code, they decode to NaN
    if noise is not None:
        v = v + noise.view(g.shape)
    codes = v.floor().clamp(0, levels).to(torch.uint8)
    return codes, lo, scale


def _encode_block(
    x: Tensor, key: Tensor, nrows: int, ncols: int, bits: int, group_size: int,
    lo_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Codes of ``nrows x ncols`` elements ``x`` in element order, lo and scale."""
    g = _grouped(x, nrows, ncols, group_size)
    noise = _uniform(key, nrows, ncols, g.numel() // nrows, g.device)
    codes, lo, scale = _quantize_block(g, bits, lo_dtype, noise)
    return codes.reshape(nrows, -1)[:, :ncols].reshape(-1), lo, scale


def _encode_flat(
    x: Tensor, key: Tensor, bits: int, group_size: int, lo_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_encode_block` of a whole tensor cut into groups of ``group_size`` consecutive
    elements (``numel % group_size == 0``): codes (uint8, element order), lo, scale.
    The fused (compiled) form is one pass over ``x``; bits are not specialised."""
    g = x.view(-1, group_size).float()
    i = torch.arange(x.numel(), dtype=torch.int32, device=x.device)
    noise = ((_mix32(i + key) >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24
    codes, lo, scale = _quantize_block(g, bits, lo_dtype, noise)
    return codes.view(-1), lo, scale


def _decode_flat(
    codes: Tensor, lo: Tensor, scale: Tensor, group_size: int, dtype: torch.dtype
) -> Tensor:
    """``lo + code * scale`` of codes in groups of ``group_size`` consecutive elements
    (bits not specialised: one compiled form per output dtype)."""
    c = codes.view(-1, group_size).float()
    v = torch.addcmul(lo.float().unsqueeze(1), c, scale.float().unsqueeze(1))
    return v.view(-1).to(dtype)


def _decode_block(
    b: Tensor, lo: Tensor, scale: Tensor, skip: int, nrows: int, ncols: int, bits: int,
    group_size: int, dtype: torch.dtype,
) -> Tensor:  # fmt: skip
    """``lo + code * scale`` of ``nrows x ncols`` elements whose codes start ``skip`` codes
    into the packed bytes ``b`` (element order, ``dtype``)."""
    codes = _unpack_pow2(b, bits, skip + nrows * ncols)[skip:]
    c = _grouped(codes, nrows, ncols, group_size)
    v = torch.addcmul(lo.float().unsqueeze(1), c, scale.float().unsqueeze(1))
    return v.reshape(nrows, -1)[:, :ncols].reshape(-1).to(dtype)


_encode_fused = fused(_encode_flat)
_decode_fused = fused(_decode_flat)
# Tensors the fused codec handles: from _FUSED_MIN elements (below, eager is as fast and no
# compile is paid) to _FUSED_MAX (int32 element offsets inside one call), whose rows are
# whole groups (then per-sample groups are runs of group_size consecutive elements).
_FUSED_MIN = 1 << 16
_FUSED_MAX = 1 << 30


def _torch_quantize(
    x: Tensor, seed: Tensor | None, bits: int, group_size: int, per_sample: bool,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """PyTorch path: (packed, lo, scale); noise from ``seed`` (or the given ``noise``, one
    float32 in [0, 1) per element in element order, for tests).

    CPU tensors up to ``_FUSED_MAX`` elements: one call of the fused (compiled) encoder
    (:mod:`fewbit.codecs.fused`); else blocks of about ``_CHUNK`` elements, eagerly. Both
    give the same bytes (the noise of an element depends on the seed and its index only).
    """
    rows, row_len = _rows(x.shape, per_sample)
    lo_dtype = _lo_dtype(x.dtype)
    flat = x.reshape(-1)
    key = None if seed is None else _seed_key(seed)
    if noise is None and key is not None and _use_fused(x, rows * row_len, row_len, group_size):
        codes, lo, scale = _encode_fused(flat, _block_key(key, 0), bits, group_size, lo_dtype)
        return _pack_pow2(codes, bits), lo, scale
    n_groups_row = -(-row_len // group_size) if row_len else 0
    codes = torch.empty(rows * row_len, dtype=torch.uint8, device=x.device)
    lo = torch.empty(rows * n_groups_row, dtype=lo_dtype, device=x.device)
    scale = torch.empty(rows * n_groups_row, dtype=torch.bfloat16, device=x.device)
    for r0, r1, c0, c1 in _blocks(rows, row_len, group_size):
        e0 = r0 * row_len + c0
        e1 = (r1 - 1) * row_len + c1
        nrows, ncols = r1 - r0, c1 - c0
        if noise is None:
            assert key is not None
            c, lo_b, scale_b = _encode_block(
                flat[e0:e1], _block_key(key, e0), nrows, ncols, bits, group_size, lo_dtype
            )
        else:
            g = _grouped(flat[e0:e1], nrows, ncols, group_size)
            u = _grouped(noise.reshape(-1)[e0:e1], nrows, ncols, group_size)
            c, lo_b, scale_b = _quantize_block(g, bits, lo_dtype, u)
            c = c.reshape(nrows, -1)[:, :ncols].reshape(-1)
        g0 = r0 * n_groups_row + c0 // group_size
        lo[g0 : g0 + lo_b.numel()] = lo_b
        scale[g0 : g0 + scale_b.numel()] = scale_b
        codes[e0:e1] = c
    return _pack_pow2(codes, bits), lo, scale


def _use_fused(t: Tensor, numel: int, row_len: int, group_size: int) -> bool:
    """Whether the fused (compiled) codec handles this tensor (see ``_FUSED_MIN``)."""
    if t.device.type != "cpu" or not _FUSED_MIN <= numel <= _FUSED_MAX:
        return False
    return row_len % group_size == 0 and compile_enabled()


def _torch_dequantize(
    packed: Tensor, lo: Tensor, scale: Tensor, shape: Sequence[int], dtype: torch.dtype,
    bits: int, group_size: int, per_sample: bool,
) -> Tensor:  # fmt: skip
    """PyTorch path of :func:`dequantize` (contiguous output): one fused call on the CPU
    (see :func:`_torch_quantize`), else eager blocks of about ``_CHUNK`` elements."""
    rows, row_len = _rows(shape, per_sample)
    if _use_fused(packed, rows * row_len, row_len, group_size):
        codes = _unpack_pow2(packed, bits, rows * row_len)
        return _decode_fused(codes, lo, scale, group_size, dtype).reshape(tuple(shape))
    n_groups_row = -(-row_len // group_size) if row_len else 0
    out = torch.empty(rows * row_len, dtype=dtype, device=packed.device)
    for r0, r1, c0, c1 in _blocks(rows, row_len, group_size):
        e0 = r0 * row_len + c0
        e1 = (r1 - 1) * row_len + c1
        a0 = e0 - e0 % 8  # start unpacking at a whole byte: a multiple of 8 codes
        b0, b1 = a0 * bits // 8, packed_nbytes(e1, bits)
        g0 = r0 * n_groups_row + c0 // group_size
        g1 = g0 + (r1 - r0) * (-(-(c1 - c0) // group_size))
        out[e0:e1] = _decode_block(
            packed[b0:b1], lo[g0:g1], scale[g0:g1], e0 - a0, r1 - r0, c1 - c0, bits,
            group_size, dtype,
        )  # fmt: skip
    return out.reshape(tuple(shape))


# ----------------------------------------------------------------------------- native path
_NATIVE_NAMES = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}
# Tensors from this many elements are split across torch's OpenMP threads by the C code itself
# when the native library is built with OpenMP (fewbit.codecs.native.uses_openmp); else serial.
_OMP_MIN = 1 << 16
# Flag bits of the C calls' ``flags`` argument (csrc/quantize.c); _FLAG_PORTABLE makes quantize
# and bfloat16 dequantize use their portable vector code where AVX-512 (BF16) instructions
# would run (for tests: same bytes).
_FLAG_LO_F16, _FLAG_SPLIT, _FLAG_PORTABLE = 1, 2, 4


def _native_lib(t: Tensor, dtype: torch.dtype) -> Any:
    """The native library when it applies to CPU tensor ``t`` and data type ``dtype`` (else
    None: torch path)."""
    if t.device.type != "cpu" or dtype not in _NATIVE_NAMES or torch.compiler.is_compiling():
        return None
    return native.library()


def _aligned(rows: int, row_len: int, group_size: int) -> bool:
    """Whether every group starts on an element index that is a multiple of 8 (whole bytes of
    the packed stream at any bit width: callers on distinct groups never share a byte)."""
    return group_size % 8 == 0 and (rows == 1 or row_len % 8 == 0)


def _split_flag(rows: int, row_len: int, group_size: int) -> int:
    """``_FLAG_SPLIT`` when the C call may split its groups across torch's OpenMP threads:
    the library has OpenMP, the tensor has at least ``_OMP_MIN`` elements and every group
    starts on a multiple of 8 elements (whole bytes of the packed stream at any bit width, so
    threads never share a byte); else 0 (one thread)."""
    aligned = group_size % 8 == 0 and (rows == 1 or row_len % 8 == 0)
    big = rows * row_len >= _OMP_MIN
    return _FLAG_SPLIT if aligned and big and native.uses_openmp() else 0


def _native_quantize(
    x: Tensor, key: int, bits: int, group_size: int, per_sample: bool, portable: bool = False
) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(packed, lo, scale) of CPU ``x`` in one native pass per group, the same bytes as the
    torch path (same noise: ``key`` is :func:`_seed_key` of the seed); None when the native
    library does not apply. Transient memory: none beyond the outputs. ``portable``: the
    C code's portable vector path even where its AVX-512 path would run (tests)."""
    if bits not in QUANT_BITS or not 1 <= group_size <= MAX_GROUP_SIZE:
        return None  # the C buffers hold one group of at most MAX_GROUP_SIZE elements
    lib = _native_lib(x, x.dtype)
    if lib is None:
        return None
    rows, row_len = _rows(x.shape, per_sample)
    flat = x.reshape(-1).contiguous()
    n_groups = rows * (-(-row_len // group_size)) if row_len else 0
    lo_dtype = _lo_dtype(x.dtype)
    # the C code sets every byte
    packed = native.fresh_buffer(lib, packed_nbytes(rows * row_len, bits), torch.uint8)
    lo = torch.empty(n_groups, dtype=lo_dtype)
    scale = torch.empty(n_groups, dtype=torch.bfloat16)
    if n_groups == 0:
        return packed, lo, scale
    fn = getattr(lib, f"fewbit_quantize_{_NATIVE_NAMES[x.dtype]}")
    lo_f16 = _FLAG_LO_F16 if lo_dtype == torch.float16 else 0
    xp, pp, lp, sp = flat.data_ptr(), packed.data_ptr(), lo.data_ptr(), scale.data_ptr()

    flags = lo_f16 | _split_flag(rows, row_len, group_size) | (_FLAG_PORTABLE if portable else 0)
    fn(xp, row_len, group_size, 0, n_groups, key & _M32, bits, flags, pp, lp, sp)
    return packed, lo, scale


def _native_dequantize(
    packed: Tensor, lo: Tensor, scale: Tensor, shape: Sequence[int], dtype: torch.dtype,
    bits: int, group_size: int, per_sample: bool, portable: bool = False,
) -> Optional[Tensor]:  # fmt: skip
    """``lo + code * scale`` (contiguous, ``dtype``) in one native pass, bitwise equal to
    the torch path; None when the native library does not apply. ``portable``: the C code's
    portable vector path even where its AVX512-BF16 path would run (tests)."""
    if lo.dtype not in (torch.float16, torch.bfloat16) or bits not in QUANT_BITS:
        return None
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        return None
    lib = _native_lib(packed, dtype)
    if lib is None:
        return None
    rows, row_len = _rows(shape, per_sample)
    n_groups = rows * (-(-row_len // group_size)) if row_len else 0
    out = native.fresh_buffer(lib, rows * row_len, dtype).view(tuple(shape))
    if n_groups == 0:
        return out
    if packed.numel() < packed_nbytes(rows * row_len, bits) or lo.numel() < n_groups:
        return None  # malformed: the torch path raises its own error
    if scale.numel() < n_groups or scale.dtype != torch.bfloat16:
        return None
    fn = getattr(lib, f"fewbit_dequantize_{_NATIVE_NAMES[dtype]}")
    packed, lo, scale = packed.contiguous(), lo.contiguous(), scale.contiguous()
    lo_f16 = _FLAG_LO_F16 if lo.dtype == torch.float16 else 0
    pp, lp, sp, op = packed.data_ptr(), lo.data_ptr(), scale.data_ptr(), out.data_ptr()

    flags = lo_f16 | _split_flag(rows, row_len, group_size) | (_FLAG_PORTABLE if portable else 0)
    fn(pp, row_len, group_size, 0, n_groups, bits, lp, flags, sp, op)
    return out


# ----------------------------------------------------------------------------- dispatch
def _kernel_quantizer(x: Tensor, group_size: int, per_sample: bool) -> Any:
    """``fewbit.kernels.quantize`` when the policy and the layout allow it, else None."""
    from ..kernels.policy import use_kernel  # the policy module does not import triton

    if x.dtype not in _KERNEL_DTYPES or not use_kernel(x):
        return None
    from ..kernels import quantize as kq  # lazy: kernels sit above codecs

    return kq if kq.supports(tuple(x.shape), group_size, per_sample) else None


@torch.library.custom_op("fewbit::quantize", mutates_args=())
def _quantize_op(
    x: Tensor, seed: Tensor, bits: int, group_size: int, per_sample: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(packed, lo, scale) of ``x``: Triton kernel on CUDA (policy), else the torch path."""
    return _quantize_impl(x, seed, bits, group_size, per_sample)


def _quantize_impl(
    x: Tensor, seed: Tensor, bits: int, group_size: int, per_sample: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The body of ``fewbit::quantize`` (:func:`quantize` calls it directly where
    :func:`fewbit.codecs.native.direct_call_ok`)."""
    kq = _kernel_quantizer(x, group_size, per_sample)
    if kq is not None:
        q = kq.quantize(x, bits, group_size, per_sample=per_sample, seed=seed)
        return q.packed, q.lo, q.scale
    got = None
    if seed.device.type == "cpu":  # the native path's key, read on the host
        got = _native_quantize(x, _seed_key(int(seed.item())), bits, group_size, per_sample)
    if got is not None:
        return got
    return _torch_quantize(x, seed, bits, group_size, per_sample)


@_quantize_op.register_fake
def _quantize_fake(
    x: Tensor, seed: Tensor, bits: int, group_size: int, per_sample: bool
) -> tuple[Tensor, Tensor, Tensor]:
    rows, row_len = _rows(x.shape, per_sample)
    n_groups = rows * ((row_len + group_size - 1) // group_size)
    packed = x.new_empty(((rows * row_len * bits + 7) // 8,), dtype=torch.uint8)
    lo = x.new_empty((n_groups,), dtype=_lo_dtype(x.dtype))
    return packed, lo, x.new_empty((n_groups,), dtype=torch.bfloat16)


@torch.library.custom_op("fewbit::dequantize", mutates_args=())
def _dequantize_op(
    packed: Tensor, lo: Tensor, scale: Tensor, shape: Sequence[int], dtype: torch.dtype,
    bits: int, group_size: int, per_sample: bool,
) -> Tensor:  # fmt: skip
    """Contiguous ``lo + code * scale`` of ``shape``/``dtype``: kernel or torch path."""
    return _dequantize_impl(packed, lo, scale, shape, dtype, bits, group_size, per_sample)


def _dequantize_impl(
    packed: Tensor, lo: Tensor, scale: Tensor, shape: Sequence[int], dtype: torch.dtype,
    bits: int, group_size: int, per_sample: bool,
) -> Tensor:  # fmt: skip
    """The body of ``fewbit::dequantize`` (:func:`dequantize` calls it directly where
    :func:`fewbit.codecs.native.direct_call_ok`)."""
    from ..kernels.policy import use_kernel

    if dtype in _KERNEL_DTYPES and use_kernel(packed):
        from ..kernels import quantize as kq

        if kq.supports(tuple(shape), group_size, per_sample):
            q = QuantizedTensor(packed, lo, scale, torch.Size(shape), dtype, bits, group_size,
                                per_sample)  # fmt: skip
            return kq.dequantize(q)
    out = _native_dequantize(packed, lo, scale, shape, dtype, bits, group_size, per_sample)
    if out is not None:
        return out
    return _torch_dequantize(packed, lo, scale, shape, dtype, bits, group_size, per_sample)


@_dequantize_op.register_fake
def _dequantize_fake(
    packed: Tensor, lo: Tensor, scale: Tensor, shape: Sequence[int], dtype: torch.dtype,
    bits: int, group_size: int, per_sample: bool,
) -> Tensor:  # fmt: skip
    return packed.new_empty(tuple(shape), dtype=dtype)


# ----------------------------------------------------------------------------- public API
def quantize_parts(
    x: Tensor, seed: Tensor, bits: int, group_size: int, per_sample: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(packed, lo, scale)`` of ``x`` (not checked: :func:`quantize` validates) with the noise
    of ``seed``: the custom op ``fewbit::quantize``, or its implementation called directly
    for plain CPU tensors outside tracing (:func:`fewbit.codecs.native.direct_call_ok`: the
    dispatcher costs about 35 us a call; same results)."""
    if native.direct_call_ok(x, seed):
        return _quantize_impl(x, seed, bits, group_size, per_sample)
    return torch.ops.fewbit.quantize(x, seed, bits, group_size, per_sample)


def dequantize_parts(
    packed: Tensor, lo: Tensor, scale: Tensor, shape: Sequence[int], dtype: torch.dtype,
    bits: int, group_size: int, per_sample: bool,
) -> Tensor:  # fmt: skip
    """Contiguous ``lo + code * scale`` of ``shape`` and ``dtype``: the custom op
    ``fewbit::dequantize``, or its implementation directly (as :func:`quantize_parts`)."""
    args = (packed, lo, scale, list(shape), dtype, bits, group_size, per_sample)
    if native.direct_call_ok(packed, lo, scale):
        return _dequantize_impl(*args)
    return torch.ops.fewbit.dequantize(*args)


def quantize(
    x: Tensor,
    bits: int,
    group_size: int = 256,
    *,
    generator: torch.Generator | None = None,
    per_sample: bool = True,
) -> QuantizedTensor:
    """Stochastically quantize floating ``x`` to ``bits`` in {1, 2, 4, 8} per element.

    Stores ``quantized_nbytes(x.shape, bits, group_size, per_sample)`` bytes (see the module
    docstring for the layout). The rounding noise is keyed by a seed drawn from ``generator``
    when given (the global RNG is then untouched), else from the global RNG of ``x``'s device
    (:func:`draw_seed`; no host sync). On CUDA the Triton kernel runs when
    :func:`fewbit.kernels.use_kernel` says so and the layout allows it; on the CPU the
    native C pass, else the PyTorch path (same format and noise everywhere: the counter hash
    of :func:`_uniform`). Traceable by ``torch.compile`` (custom op ``fewbit::quantize``
    with a fake implementation); with a ``generator`` the seed draw breaks the graph. Plain
    CPU tensors outside tracing and dispatch modes skip the dispatcher
    (:func:`fewbit.codecs.native.direct_call_ok`; same results).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    check_quant_bits(bits)
    check_group_size(group_size)
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}")
    seed = _seed_for(generator, x.device)
    x = x.detach()
    packed, lo, scale = quantize_parts(x, seed, bits, group_size, per_sample)
    return QuantizedTensor(
        packed, lo, scale, x.shape, x.dtype, bits, group_size, per_sample, saved_stride(x)
    )


def _seed_for(generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return draw_seed(None, device)
    return _draw_seed_eager(generator, device)


@torch.compiler.disable
def _draw_seed_eager(generator: torch.Generator, device: torch.device) -> Tensor:
    """Generator objects cannot be traced: draw outside any compiled graph."""
    return draw_seed(generator, device)


def dequantize(q: QuantizedTensor) -> Tensor:
    """Tensor of ``q.shape`` and ``q.dtype`` on ``q``'s device: ``lo + code * scale``.

    Laid out with ``q.stride`` when it was saved non-contiguous (see
    :func:`fewbit.codecs.protocol.restride`).
    """
    out = dequantize_parts(
        q.packed, q.lo, q.scale, q.shape, q.dtype, q.bits, q.group_size, q.per_sample
    )
    return restride(out, q.stride)
