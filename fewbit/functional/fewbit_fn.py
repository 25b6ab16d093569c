"""The autograd Function behind every few-bit activation.

Forward computes torch's own activation (so the output is torch's, bit for bit)
and stores, for backward, only a packed code of the input: ``ceil(n*bits/8)``
bytes instead of the ``n * element_size`` bytes torch keeps, plus a small
fixed-size side store for non-finite inputs (below). Backward returns
``grad_output * levels[code]``.

On CUDA (Triton importable, ``FEWBIT_DISABLE_TRITON`` not ``1``) forward and
backward are single fused kernel passes (:mod:`fewbit.kernels`) with the same codes
and packing; their output is within a few ulp of torch's rather than bit-identical.

On the CPU (contiguous float16/bfloat16/float32/float64, boundary tables) encode + pack + the
per-chunk count of non-finite inputs is one native pass, and backward's unpack + lookup +
multiply another (:mod:`fewbit.codecs.native`: C compiled at first use, vectorized, split
over torch's own OpenMP threads from 64K elements per thread when the library is built with
OpenMP); the bytes and gradients are the torch path's. The forward allocates only the packed
code and the side store besides torch's output (no float32 copy of 16-bit inputs). Without
a C compiler, or with ``FEWBIT_COMPILE=0`` / ``FEWBIT_NATIVE=0``, the torch-op path below
runs (same results, about 10x slower).

No host-device synchronisation: the constant tables (boundaries, levels, torch's
derivative at +inf, -inf and NaN) are made once per (values, dtype, device) and
cached (:func:`table_tensor`); nothing in forward or backward reads a device value.

Non-finite inputs (NaN, +-inf) get exactly torch's gradient without reading the
device: forward scans each chunk for non-finite values into a fixed number of slots,
``min(chunk, 8 + chunk // 1024)`` per chunk (``torch.nonzero_static``), each slot one
int64 ``4 * index + class`` (class 0: +inf, 1: -inf, 2: NaN; -1: empty), and keeps each
chunk's count of non-finite values. Backward computes ``grad * levels[code]`` and
overwrites the slotted elements with ``grad * d[class]``, d being torch's own derivative
at +inf, -inf and NaN in the input's dtype. Stored: ``8 * (slots + chunks)`` bytes (at
most 72 for small tensors, then about 1/128 byte per element: 2% of a 3-bit code). When a
chunk holds more non-finite values than slots (over about 1 in 1024), its other elements'
gradients are NaN (never a finite wrong value).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Optional

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .. import kernels
from ..codecs import native
from ..codecs.bitpack import pack, packed_nbytes, unpack
from ..codecs.marks import mark_compact

__all__ = [
    "ActivationSpec",
    "FewBitActivation",
    "apply_fewbit",
    "check_floating",
    "nonfinite_slots",
    "private_autograd",
    "side_store_nbytes",
    "table_tensor",
]

Forward = Callable[[Tensor], Tensor]
Encoder = Callable[[Tensor], Tensor]
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements encoded or looked up at once on the PyTorch path (a multiple of 8, so that each
# chunk starts on a byte boundary of the packed stream for every bit width). Its transient
# memory is a few bytes per chunk element: 128K elements keep it below 1 MiB.
_CHUNK = 1 << 17
# Chunk of the non-finite scan on the kernel path (fewer launches on a GPU; 4 MiB of mask).
_KERNEL_SCAN_CHUNK = 1 << 22
# One non-finite slot per this many elements of a chunk (plus 8).
_ELEMENTS_PER_SLOT = 1024
_PLUS_INF, _MINUS_INF, _NAN = 0, 1, 2


def check_floating(input: Tensor, name: str = "input") -> None:
    """Raise a TypeError naming ``name`` unless ``input`` is a floating-point tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {input.dtype}")


def _keep(t: Tensor) -> Tensor:
    return t


def private_autograd() -> contextlib.AbstractContextManager:
    """Identity saved-tensor hooks for fewbit's own transient graphs (table building, the
    derivative at non-finite inputs): they are not saves of the user's model, so outer hooks
    (the generic compressor, the profiler) must not see them. While torch.compile traces
    (a graph has no Python saved-tensor hooks) it is a no-op context."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


@dataclass(frozen=True)
class ActivationSpec:
    """What one few-bit activation computes, how it encodes its input, what a code means.

    ``kernel`` names the activation for the fused Triton kernels (``None``: a custom
    forward the kernels do not know, always the PyTorch path); ``params``,
    ``boundaries`` and ``symmetric`` are what those kernels need to compute the same
    output and codes.
    """

    forward: Forward
    encode: Encoder
    levels: tuple[float, ...]
    bits: int
    kernel: Optional[str] = None
    params: Mapping[str, float] = field(default_factory=dict)
    boundaries: Optional[tuple[float, ...]] = None
    symmetric: bool = False


# --- cached constant tables ----------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def table_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.tensor(values, dtype=float64).to(dtype)`` on ``device``, made once and cached.

    The copy to a GPU happens at the first use of a (values, dtype, device) only; later calls
    return the same tensor (treat it as read-only). The cache holds at most 512 tables of a
    few hundred bytes each.
    """
    return torch.tensor(values, dtype=torch.float64).to(dtype).to(device)


def _derivative_key(spec: ActivationSpec) -> Hashable:
    if spec.kernel is not None:
        return (spec.kernel, tuple(sorted((k, repr(v)) for k, v in spec.params.items())))
    return spec.forward


_DERIVATIVES: dict = {}
_DERIVATIVES_MAX = 512


def _nonfinite_derivatives(spec: ActivationSpec, dtype: torch.dtype, device: torch.device):
    """torch's derivative of ``spec.forward`` at (+inf, -inf, NaN), in ``dtype`` on ``device``.

    Computed once per (activation, dtype, device) with torch's own autograd on the CPU (on
    ``device`` if the CPU lacks the op in that dtype) and cached: 3 values per entry, at most
    512 entries (the oldest is dropped first).
    """
    key = (_derivative_key(spec), dtype, device)
    hit = _DERIVATIVES.get(key)
    if hit is not None:
        return hit
    points = [math.inf, -math.inf, math.nan]
    derivative = None
    for where in (torch.device("cpu"), device):
        try:
            with torch.enable_grad(), private_autograd():
                xs = torch.tensor(points, dtype=dtype, device=where).requires_grad_(True)
                (derivative,) = torch.autograd.grad(spec.forward(xs), xs, torch.ones_like(xs))
            break
        except (RuntimeError, NotImplementedError):
            continue
    if derivative is None:
        raise RuntimeError(f"cannot differentiate the activation in {dtype}")
    derivative = derivative.detach().to(device)
    if len(_DERIVATIVES) >= _DERIVATIVES_MAX:
        _DERIVATIVES.pop(next(iter(_DERIVATIVES)))
    _DERIVATIVES[key] = derivative
    return derivative


# --- the non-finite side store ---------------------------------------------------------------


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _slots_of(length: int) -> int:
    """Slots of a chunk of ``length`` elements: 8 + 1 per 1024, at most one per element."""
    return min(length, 8 + length // _ELEMENTS_PER_SLOT)


def side_store_nbytes(n: int, chunk: Optional[int] = None) -> int:
    """Bytes of the non-finite side store for ``n`` elements scanned in chunks of ``chunk``."""
    chunk = _CHUNK if chunk is None else chunk
    parts = _chunks(n, chunk)
    return 8 * sum(_slots_of(stop - start) + 1 for start, stop in parts)


def nonfinite_slots(flat: Tensor, chunk: int) -> Tensor:
    """The side store of 1-D ``flat``: slots of every chunk, then every chunk's count.

    int64; slot = ``4 * index + class`` or -1. Device ops only (no host read). Transient
    memory: one chunk of x's dtype and the slots of one chunk.
    """
    slots, counts = [], []
    for start, stop in _chunks(flat.numel(), chunk):
        chunk_slots, count = _chunk_slots(flat, start, stop)
        slots.append(chunk_slots)
        counts.append(count)
    if not slots:
        return torch.empty(0, dtype=torch.int64, device=flat.device)
    return torch.cat(slots + counts)


def _chunk_slots(flat: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(slots, count of non-finite values as a 1-element int64 tensor) of flat[start:stop]."""
    part = flat[start:stop]
    # x - x is 0 for finite x and NaN otherwise; torch.nonzero_static and count_nonzero
    # take it directly (on a bool mask, the CPU kernels make an int64 copy)
    bad = part - part
    count = torch.count_nonzero(bad).reshape(1)
    index = torch.nonzero_static(bad, size=_slots_of(stop - start), fill_value=-1)
    index = index.reshape(-1)
    value = part[index.clamp_min(0)]
    cls = torch.where(value > 0, _PLUS_INF, _MINUS_INF)
    cls = torch.where(value != value, _NAN, cls)
    return torch.where(index >= 0, (index + start) * 4 + cls, -1), count


def _split_side(side: Tensor, n: int, chunk: int) -> tuple[Tensor, Tensor]:
    """(slots, per-chunk counts) of a side store."""
    total = sum(_slots_of(stop - start) for start, stop in _chunks(n, chunk))
    return side[:total], side[total:]


def _overflow(side: Tensor, n: int, chunk: int) -> Tensor:
    """Per chunk: True where it held more non-finite values than slots (device bool)."""
    _, counts = _split_side(side, n, chunk)
    caps = table_tensor(
        tuple(float(_slots_of(stop - start)) for start, stop in _chunks(n, chunk)),
        torch.float64,
        side.device,
    )
    return counts > caps


def _apply_slots(
    out: Tensor, grad_flat: Tensor, side: Tensor, n: int, chunk: int, derivative: Tensor
) -> None:
    """out[index] = grad[index] * derivative[class] for every filled slot; out has n + 1
    elements (empty slots write element n, which is dropped)."""
    slots, _ = _split_side(side, n, chunk)
    if slots.numel() == 0:
        return
    if side.device.type == "cpu" and native.library() is not None:
        if not _any_nonfinite(side, n, chunk):  # the native CPU path reads counts anyway
            return  # every slot empty
    valid = slots >= 0
    index = torch.where(valid, slots >> 2, 0)
    cls = torch.where(valid, slots & 3, 0)
    value = grad_flat[index] * derivative[cls]
    out[torch.where(valid, index, n)] = value.to(out.dtype)


# --- forward and backward passes -------------------------------------------------------------


def _use_kernels(t: Tensor) -> bool:
    # through kernels.available (the policy use_kernel under its public name): the GPU
    # reference check patches that name to force the kernel path in its CPU dry run
    return t.dtype in _KERNEL_DTYPES and kernels.available(t)


@functools.lru_cache(maxsize=512)
def _rounded_floats(values: tuple[float, ...], dtype: torch.dtype) -> tuple[float, ...]:
    """``values`` rounded to ``dtype`` as Python floats (how torch compares a tensor with a
    Python scalar), computed once per (values, dtype) on the CPU."""
    return tuple(torch.tensor(values, dtype=torch.float64).to(dtype).double().tolist())


def _encode(x: Tensor, spec: ActivationSpec) -> Tensor:
    """uint8 codes of x: ``spec.encode(x)``; for a boundary table, the same codes as
    ``Table.encode`` (boundaries strictly below x, or |x|) from cached boundaries, so no
    call makes a tensor from a Python list. Up to 15 boundaries: in-place comparisons with
    Python scalars (1 byte per element of transient memory besides the codes); more: one
    ``torch.bucketize`` against the boundaries cached on x's device in x's dtype."""
    if spec.boundaries is None:
        return spec.encode(x)
    src = x.abs() if spec.symmetric else x
    if len(spec.boundaries) > 15:
        bounds = table_tensor(tuple(spec.boundaries), x.dtype, x.device)
        return torch.bucketize(src, bounds, out_int32=True).to(torch.uint8)
    bounds = _rounded_floats(tuple(spec.boundaries), x.dtype)
    codes = torch.gt(src, bounds[0]).view(torch.uint8)
    above = torch.empty(src.shape, dtype=torch.bool, device=x.device)
    for bound in bounds[1:]:
        torch.gt(src, bound, out=above)
        codes.add_(above.view(torch.uint8))
    return codes


def _encode_and_pack(flat: Tensor, spec: ActivationSpec) -> Tensor:
    """pack(encode(x)) in chunks of ``_CHUNK`` elements: the uint8 codes and comparison
    masks never exist for the whole tensor at once (under 1 MiB of transient memory)."""
    n, bits = flat.numel(), spec.bits
    if n <= _CHUNK:
        return pack(_encode(flat, spec), bits)
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device)
    for start, stop in _chunks(n, _CHUNK):  # chunks start on byte boundaries (8 | _CHUNK)
        codes = _encode(flat[start:stop], spec)
        out[start * bits // 8 : packed_nbytes(stop, bits)] = pack(codes, bits)
    return out


def _rounded_bounds(spec: ActivationSpec, x: Tensor) -> Optional[Tensor]:
    """The table's boundaries rounded to x.dtype, as float32 on x's device (cached)."""
    if spec.boundaries is None:
        return None
    return table_tensor(tuple(spec.boundaries), x.dtype, x.device).float()


def _forward_and_pack(x: Tensor, spec: ActivationSpec) -> tuple[Tensor, Tensor, Tensor, int]:
    """(y, packed codes, non-finite side store, its chunk): one fused Triton pass on CUDA
    (plus the non-finite scan), torch ops elsewhere."""
    if spec.kernel is not None and _use_kernels(x):
        bounds = None
        if spec.boundaries is not None:
            bounds = table_tensor(tuple(spec.boundaries), x.dtype, x.device)
        y, packed = kernels.activation_forward(
            x, spec.kernel, dict(spec.params), bounds, spec.symmetric, spec.bits
        )
        chunk = _KERNEL_SCAN_CHUNK
        return y, packed, nonfinite_slots(x.reshape(-1), chunk), chunk
    flat = x.reshape(-1)
    y = spec.forward(x)
    if spec.boundaries is None:
        fast = _native_mask_and_scan(flat, spec)
    else:
        fast = _native_encode_and_scan(flat, spec)
    if fast is not None:
        return y, fast[0], fast[1], _CHUNK
    return y, _encode_and_pack(flat, spec), nonfinite_slots(flat, _CHUNK), _CHUNK


# --- native CPU passes (fewbit.codecs.native): same bytes as the torch-op passes ---------------
#
# Floats are compared by order keys of their bit patterns: the signed magnitude of the
# pattern (an int, +0 and -0 both 0), monotone in the value for every non-NaN float, so
# comparing keys is comparing values exactly, without any conversion.

# dtype -> (bits of the pattern, int dtype of the same size, pattern of +inf)
_NATIVE_FORMATS = {
    torch.float16: (16, torch.int16, 0x7C00),
    torch.bfloat16: (16, torch.int16, 0x7F80),
    torch.float32: (32, torch.int32, 0x7F800000),
    torch.float64: (64, torch.int64, 0x7FF0000000000000),
}
_NATIVE_DECODE = {
    torch.float32: "fewbit_decode_mul_f32",
    torch.float64: "fewbit_decode_mul_f64",
    torch.bfloat16: "fewbit_decode_mul_bf16",
    torch.float16: "fewbit_decode_mul_f16",
}
# Boundary tables longer than this are encoded with torch.bucketize on the torch path (NaN
# counts as above every boundary); shorter ones with comparisons (NaN is above none).
_MAX_COMPARED = 15


@functools.lru_cache(maxsize=512)
def _boundary_keys(values: tuple[float, ...], dtype: torch.dtype) -> Tensor:
    """Order keys of ``values`` rounded to ``dtype`` (as the torch path rounds them), as the
    native encoder computes them (csrc/activations.c, ``KEY``): the bit pattern as a signed
    int, negative patterns with their magnitude bits flipped; a zero boundary (either sign)
    takes the key of +0, so that the encoder's "key(x) > key(b)" is "x > b". Ints of the
    dtype's width on the CPU, made once per (values, dtype)."""
    width, int_dtype, _ = _NATIVE_FORMATS[dtype]
    patterns = table_tensor(values, dtype, torch.device("cpu")).view(int_dtype).tolist()
    mask = (1 << (width - 1)) - 1
    keys = [0 if p & mask == 0 else p ^ mask if p < 0 else p for p in patterns]
    return torch.tensor(keys, dtype=int_dtype)


def _native_ok(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _NATIVE_FORMATS and t.is_contiguous()


def _native_encode_and_scan(flat: Tensor, spec: ActivationSpec) -> Optional[tuple[Tensor, Tensor]]:
    """(packed codes, non-finite side store) of 1-D CPU ``flat`` in one native pass, the same
    bytes as ``_encode_and_pack`` and ``nonfinite_slots(flat, _CHUNK)``; None when the native
    library is unavailable or does not apply (then the caller runs the torch path).

    The pass writes each chunk's count of non-finite values straight into the side store's
    tail; only chunks that hold some run the torch slot scan (a host read of the counts is
    free on the CPU). Allocates the packed codes and the side store, nothing else."""
    if spec.boundaries is None or not _native_ok(flat) or torch.compiler.is_compiling():
        return None
    lib = native.library()
    if lib is None:
        return None
    n, bits = flat.numel(), spec.bits
    width, _, inf_bits = _NATIVE_FORMATS[flat.dtype]
    keys = _boundary_keys(tuple(spec.boundaries), flat.dtype)
    nb = keys.numel()
    nan_code = nb if nb > _MAX_COMPARED else 0
    packed = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8)
    side, counts_at = _empty_side(n)
    encode = getattr(lib, f"fewbit_encode_pack_{width}")
    bad = encode(
        flat.data_ptr(),
        n,
        inf_bits,
        int(spec.symmetric),
        keys.data_ptr(),
        nb,
        nan_code,
        bits,
        packed.data_ptr(),
        _CHUNK,
        side.data_ptr() + 8 * counts_at,
        _threads(n),
    )
    if bad:
        _fill_slots(flat, side, counts_at)
    return packed, side


def _empty_side(n: int) -> tuple[Tensor, int]:
    """(side store of n elements with every slot empty (-1), index of its first count); the
    counts (the tail) are written by the native pass."""
    parts = _chunks(n, _CHUNK)
    total = sum(_slots_of(stop - start) for start, stop in parts)
    side = torch.empty(total + len(parts), dtype=torch.int64)
    side[:total].fill_(-1)
    return side, total


def _fill_slots(flat: Tensor, side: Tensor, counts_at: int) -> None:
    """The torch slot scan (:func:`_chunk_slots`) of the chunks whose count is not 0."""
    counts = side[counts_at:].tolist()
    offset = 0
    for i, (start, stop) in enumerate(_chunks(flat.numel(), _CHUNK)):
        size = _slots_of(stop - start)
        if counts[i]:
            side[offset : offset + size] = _chunk_slots(flat, start, stop)[0]
        offset += size


def _native_mask_and_scan(flat: Tensor, spec: ActivationSpec) -> Optional[tuple[Tensor, Tensor]]:
    """(packed 1-bit mask, side store) for a mask spec: ``spec.encode`` (torch) on chunks of
    ``8 * _CHUNK`` elements (1 MiB of transient bool mask), each packed natively,
    and the non-finite counts in one native pass; the same bytes as the torch path. None when
    the native library does not apply."""
    if spec.bits != 1 or not _native_ok(flat) or torch.compiler.is_compiling():
        return None
    lib = native.library()
    if lib is None:
        return None
    n = flat.numel()
    width, _, inf_bits = _NATIVE_FORMATS[flat.dtype]
    packed = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8)
    for start, stop in _chunks(n, 8 * _CHUNK):  # byte boundaries (8 | _CHUNK)
        mask = spec.encode(flat[start:stop])
        if mask.dtype != torch.bool or mask.numel() != stop - start:
            return None  # not a plain boolean mask: the torch path packs it
        mask = mask.contiguous()
        lib.fewbit_pack_mask(mask.data_ptr(), stop - start, packed.data_ptr() + start // 8)
    side, counts_at = _empty_side(n)
    count = getattr(lib, f"fewbit_count_nonfinite_{width}")
    bad = count(flat.data_ptr(), n, inf_bits, _CHUNK, side.data_ptr() + 8 * counts_at, _threads(n))
    if bad:
        _fill_slots(flat, side, counts_at)
    return packed, side


def _native_grad_times_levels(
    flat: Tensor, packed: Tensor, side: Tensor, chunk: int, lut: Tensor, spec: ActivationSpec
) -> Optional[Tensor]:
    """grad * levels[code] into a new flat buffer of n + 1 elements (NaN levels in the scan
    chunks whose slots overflowed, 0 where the level is 0) in one native pass; None (nothing
    done) when the native library does not apply. The buffer is asked for transparent huge
    pages when large (:func:`fewbit.codecs.native.fresh_buffer`)."""
    if not (_native_ok(flat) and packed.is_contiguous()) or torch.compiler.is_compiling():
        return None
    lib = native.library()
    if lib is None:
        return None
    decode = getattr(lib, _NATIVE_DECODE[flat.dtype])
    n, bits = flat.numel(), spec.bits
    out = native.fresh_buffer(lib, n + 1, flat.dtype)
    zero_exact = int(0.0 in spec.levels)
    scan = _chunks(n, chunk)
    poisoned = _overflow(side, n, chunk).tolist() if _any_nonfinite(side, n, chunk) else None
    gp, op, size = flat.data_ptr(), out.data_ptr(), flat.element_size()
    lo = 0
    while lo < len(scan):  # runs of scan chunks with the same level table
        hi = len(scan)
        if poisoned is not None:
            hi = lo + 1
            while hi < len(scan) and poisoned[hi] == poisoned[lo]:
                hi += 1
        start, stop = scan[lo][0], scan[hi - 1][1]
        table = torch.full_like(lut, math.nan) if poisoned and poisoned[lo] else lut
        decode(
            packed.data_ptr(),
            n,
            bits,
            gp + start * size,
            op + start * size,
            start,
            stop,
            table.data_ptr(),
            zero_exact,
            _threads(stop - start),
        )
        lo = hi
    return out


def _any_nonfinite(side: Tensor, n: int, chunk: int) -> bool:
    """Whether the side store counts any non-finite input (a host read: CPU side stores)."""
    _, counts = _split_side(side, n, chunk)
    return bool(counts.any())


# Elements per OpenMP thread below which a native pass runs in the calling thread alone. The
# passes run on torch's own OpenMP threads (fewbit.codecs.native builds with -fopenmp when
# torch's runtime is libgomp), which are still spinning after torch's previous op, so a team
# starts in microseconds; a thread's share should still take well above that (64K elements:
# about 20-40 us of work).
_PER_THREAD = 1 << 16


def _threads(n: int) -> int:
    """OpenMP threads for a native pass over n elements: up to torch.get_num_threads(), each
    with at least ``_PER_THREAD`` elements; 1 when the library is serial."""
    if not native.uses_openmp():
        return 1
    return max(1, min(torch.get_num_threads(), n // _PER_THREAD))


def _poisoned_levels(lut: Tensor, overflow: Tensor) -> Tensor:
    """[chunks, 2**bits]: the levels, NaN in the rows of chunks whose slots overflowed."""
    nan = torch.full_like(lut, math.nan)
    return torch.where(overflow[:, None], nan[None, :], lut[None, :])


def _grad_times_levels(
    grad: Tensor, packed: Tensor, side: Tensor, chunk: int, spec: ActivationSpec
) -> Tensor:
    """grad * levels[code] into a flat buffer of n + 1 elements (the last is scratch); 0
    where the level is 0, whatever the gradient (torch's piecewise-linear backward).

    Multiplied in float32 (float64 for float64) and rounded once. On the PyTorch path the
    codes are unpacked and looked up ``_CHUNK`` elements at a time, so the transient memory
    is under 2 MiB besides the result.
    """
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    lut = table_tensor(tuple(spec.levels), compute, grad.device)
    flat = grad.reshape(-1)
    n, bits = flat.numel(), spec.bits
    native_out = _native_grad_times_levels(flat, packed, side, chunk, lut, spec)
    if native_out is not None:
        return native_out
    out = torch.empty(n + 1, dtype=grad.dtype, device=grad.device)
    overflow = _overflow(side, n, chunk)
    if _use_kernels(grad):
        lut_k = torch.where(overflow.any(), math.nan, lut)
        from ..kernels.activations import activation_backward

        zero_exact = 0.0 in spec.levels
        activation_backward(flat.contiguous(), packed, lut_k, bits, out[:n], zero_exact)
        return out
    zero_exact = 0.0 in spec.levels
    rows = _poisoned_levels(lut, overflow)
    for start, stop in _chunks(n, _CHUNK):
        row = start // chunk  # chunk (the scan's) is a multiple of _CHUNK
        part = packed[start * bits // 8 : packed_nbytes(stop, bits)]
        codes = unpack(part, bits, stop - start).int()
        levels = rows[row].index_select(0, codes)
        torch.mul(flat[start:stop], levels, out=out[start:stop])  # one rounding to out.dtype
        if zero_exact:  # torch's piecewise-linear backward selects 0 (even for inf/NaN grads)
            out[start:stop].masked_fill_(levels == 0, 0)
    return out


class FewBitActivation(torch.autograd.Function):
    """y = forward(x); saves the packed code of x (and the non-finite side store);
    backward: grad * levels[code], torch's derivative at non-finite inputs."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, spec: ActivationSpec) -> Tensor:  # type: ignore[override]
        y, packed, side, chunk = _forward_and_pack(x, spec)
        ctx.save_for_backward(mark_compact(packed), mark_compact(side))
        ctx.shape = x.shape  # type: ignore[attr-defined]
        ctx.dtype = x.dtype  # type: ignore[attr-defined]
        ctx.chunk = chunk  # type: ignore[attr-defined]
        ctx.spec = spec  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fewbit activations keep only a few-bit code of their input, so they cannot "
                "be differentiated twice (backward with create_graph=True); use the torch.nn "
                "activation where a second derivative is needed"
            )
        packed, side = ctx.saved_tensors  # type: ignore[attr-defined]
        spec, chunk = ctx.spec, ctx.chunk  # type: ignore[attr-defined]
        n = grad.numel()
        out = _grad_times_levels(grad, packed, side, chunk, spec)
        derivative = _nonfinite_derivatives(spec, ctx.dtype, grad.device)  # type: ignore[attr-defined]
        _apply_slots(out, grad.reshape(-1), side, n, chunk, derivative)
        return out[:n].view(ctx.shape), None  # type: ignore[attr-defined]


# --- torch.compile: the same op as torch.library custom ops ------------------------------------
#
# A traced graph calls ``fewbit::activation_forward`` / ``fewbit::activation_backward``, opaque
# ops whose eager implementations are the functions above (so the forward output is still
# torch's own, bit for bit, and the codes the same). Ops take tensors and plain values, so a
# spec is named by a key string; ``_SPECS`` maps keys to specs (one entry per distinct
# activation, table and bit width used under torch.compile; a few hundred bytes each).

_SPECS: dict[str, ActivationSpec] = {}


def _spec_key(spec: ActivationSpec) -> str:
    """The key of a spec with a kernel name: its values name it completely."""
    params = tuple(sorted((k, repr(v)) for k, v in spec.params.items()))
    return repr((spec.kernel, params, spec.levels, spec.bits, spec.boundaries, spec.symmetric))


@torch.compiler.disable
def _register(key: str, spec: ActivationSpec) -> None:
    """Record ``spec`` under ``key`` now (not as a deferred side effect of a trace: the ops'
    fake and real implementations look it up while tracing and at the first run)."""
    _SPECS[key] = spec


def _derivatives_outside_autograd(spec: ActivationSpec, dtype: torch.dtype, device) -> Tensor:  # noqa: ANN001
    """:func:`_nonfinite_derivatives` from inside a custom op, where autograd is excluded for
    this thread: a first computation runs in a fresh thread (once per activation, dtype and
    device; then it is cached)."""
    key = (_derivative_key(spec), dtype, device)
    hit = _DERIVATIVES.get(key)
    if hit is not None:
        return hit
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_nonfinite_derivatives, spec, dtype, device).result()


def _scan_chunk(x: Tensor, spec: ActivationSpec) -> int:
    return _KERNEL_SCAN_CHUNK if spec.kernel is not None and _use_kernels(x) else _CHUNK


@torch.library.custom_op("fewbit::activation_forward", mutates_args=())
def _forward_op(x: Tensor, key: str) -> tuple[Tensor, Tensor, Tensor]:
    y, packed, side, _ = _forward_and_pack(x, _SPECS[key])
    return y, packed, side


@_forward_op.register_fake
def _forward_fake(x: Tensor, key: str) -> tuple[Tensor, Tensor, Tensor]:
    spec = _SPECS[key]
    n, chunk = x.numel(), _scan_chunk(x, spec)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if chunk == _CHUNK:
        y = torch.empty_like(x)
    packed = x.new_empty(packed_nbytes(n, spec.bits), dtype=torch.uint8)
    return y, packed, x.new_empty(side_store_nbytes(n, chunk) // 8, dtype=torch.int64)


@torch.library.custom_op("fewbit::activation_backward", mutates_args=())
def _backward_op(
    grad: Tensor, packed: Tensor, side: Tensor, key: str, chunk: int, dtype: torch.dtype
) -> Tensor:
    spec = _SPECS[key]
    n = grad.numel()
    out = _grad_times_levels(grad, packed, side, chunk, spec)
    derivative = _derivatives_outside_autograd(spec, dtype, grad.device)
    _apply_slots(out, grad.reshape(-1), side, n, chunk, derivative)
    return out[:n].view(grad.shape).clone()


@_backward_op.register_fake
def _backward_fake(
    grad: Tensor, packed: Tensor, side: Tensor, key: str, chunk: int, dtype: torch.dtype
) -> Tensor:
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, key = inputs
    _, packed, side = output
    ctx.save_for_backward(packed, side)
    ctx.key, ctx.dtype = key, x.dtype
    ctx.chunk = _scan_chunk(x, _SPECS[key])


def _op_backward(ctx, grad: Tensor, *_: Tensor):  # noqa: ANN001
    packed, side = ctx.saved_tensors
    return _backward_op(grad, packed, side, ctx.key, ctx.chunk, ctx.dtype), None


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def apply_fewbit(x: Tensor, spec: ActivationSpec) -> Tensor:
    """Run ``spec.forward`` on x, saving only a ``spec.bits``-bit code when a gradient is needed.

    Eager: the autograd Function :class:`FewBitActivation`. While torch.compile traces, a
    spec with a kernel name goes through the custom ops ``fewbit::activation_forward`` /
    ``fewbit::activation_backward`` (same computation). No graph break once the spec is
    registered, i.e. after its first call (eager or traced: a first traced call registers
    it through one graph break)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return spec.forward(x)
    if spec.kernel is None:
        return FewBitActivation.apply(x, spec)
    key = _spec_key(spec)
    if key not in _SPECS:  # first use of this activation/table: a graph break when tracing
        _register(key, spec)
    if torch.compiler.is_compiling():
        return _forward_op(x, key)[0]
    return FewBitActivation.apply(x, spec)
