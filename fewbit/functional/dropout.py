"""Dropout that saves its keep-mask at 1 bit per element (lossless).

:func:`dropout` stores ``ceil(n / 8)`` bytes for backward (a 1-bit
:class:`~fewbit.codecs.protocol.PackedCodes`, the layout of
:class:`~fewbit.codecs.protocol.BitPacker`: bit ``e`` of the stream is element ``e`` in the
order below) instead of torch's ``n``-element noise tensor in the input dtype (the CPU
keeps it as float32: 32x).

The mask on the CPU (:func:`keep_mask`): element ``e`` (its index in memory order: the
flattened tensor when contiguous, e.g. ``N, H, W, C`` order for channels-last; the flattened
logical order for tensors that are not dense; 64-bit) is kept when
``(hash(e) >> 8) >= thr`` with ``thr = round(p * 2**24)`` and
``hash(e) = mix32(mix32(lo + k0) ^ k1 ^ mix32(hi))`` (``lo``/``hi`` the low/high 32 bits of
``e``; ``mix32`` a bijective xorshift-multiply hash of 32-bit integers; all arithmetic mod
``2**32``). The keys ``k0, k1`` are two 32-bit integers drawn per call from ``generator``
(default: torch's CPU generator) with ``torch.randint``, so ``torch.manual_seed`` reproduces
the mask, and so does activation checkpointing's RNG-state restore in the recompute. For fixed
keys the hash of ``lo`` is a bijection, so every aligned run of ``2**32`` elements keeps
exactly ``2**32 - thr * 2**8`` of them: the keep probability is ``1 - thr / 2**24``, within
``2**-25`` of ``1 - p``. The mask is not the one torch's dropout draws under the same seed
(same distribution, other numbers; fewbit's CPU dropout used torch's draws before).

Output and gradient are torch's arithmetic given the mask: ``x * noise`` and
``grad * noise`` with ``noise = mask / (1 - p)`` in the input dtype (``scale`` rounded as
torch's ``noise.div_(1 - p)``); a dropped element is ``x * 0`` (``-0.0`` for negative ``x``,
NaN for NaN/inf ``x``, as in torch).

Passes over ``n`` elements on the CPU with the native library
(:func:`fewbit.codecs.native.library`): forward is one C pass (reads ``x``, writes the output
and the packed mask; the keep bits come from the hash, no noise tensor), backward one C pass
(reads the gradient and the mask), both on torch's OpenMP threads. Dense non-contiguous
tensors are read in memory order (the output keeps their strides, as torch's); tensors that
are not dense are first copied contiguous. Without the library (``FEWBIT_COMPILE=0``, no C
compiler) the same hash runs as torch int64 ops in 1M-element chunks (same mask, same bytes;
slower). While ``torch.compile`` traces, the CPU passes are the custom ops
``fewbit::dropout_forward`` and ``fewbit::dropout_backward`` (same computation). Other devices
(CUDA) draw the mask with torch's ``bernoulli_`` and pack it
(:class:`~fewbit.codecs.protocol.BitPacker`).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..codecs.bitpack import pack, packed_nbytes, unpack
from ..codecs.counter_hash import MASK32, mix32
from ..codecs.marks import mark_compact
from ..codecs.native import library
from ..codecs.protocol import BitPacker, PackedCodes
from .saved import load_encoded, save_encoded

__all__ = ["apply_mask", "dropout", "dropout_with_mask", "keep_mask", "keep_threshold"]

# Elements per chunk of the eager hash (a multiple of 8): its int64 temporaries are
# 8 bytes per element each, so chunks bound them to a few MiB.
_EAGER_CHUNK = 1 << 20
_C_NAMES = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}


def keep_threshold(p: float) -> int:
    """``thr = round(p * 2**24)``: element kept when ``(hash >> 8) >= thr``, i.e. with
    probability ``1 - thr / 2**24`` (within ``2**-25`` of ``1 - p``)."""
    return int(round(p * (1 << 24)))


def keep_mask(start: int, stop: int, k0: int, k1: int, thr: int) -> Tensor:
    """Keep bits (bool, CPU) of the elements ``start .. stop - 1`` for keys ``k0, k1`` and
    threshold ``thr`` (the eager form of the C hash in ``csrc/dropout.c``)."""
    e = torch.arange(start, stop, dtype=torch.int64)
    his = {start >> 32, (stop - 1) >> 32} if stop > start else set()
    if len(his) == 1:  # one 2**32-element run: one key (a Python int) for it
        kb: Any = k1 ^ mix32(his.pop())
    else:
        kb = k1 ^ mix32(e >> 32)
    h = mix32(((e & MASK32) + k0) & MASK32)
    h = mix32(h ^ kb)
    return (h >> 8) >= thr


def _draw_keys(generator: Optional[torch.Generator]) -> Tensor:
    """The two 32-bit hash keys of one call (int64, CPU), drawn from ``generator``."""
    return torch.randint(0, 1 << 32, (2,), dtype=torch.int64, generator=generator)


def _scale(p: float, dtype: torch.dtype) -> Tensor:
    """``1 / (1 - p)`` rounded as torch's dropout rounds it (``ones.div_(1 - p)``)."""
    return torch.ones((), dtype=dtype).div_(1 - p)


def _memory_order(x: Tensor) -> Optional[Tuple[int, ...]]:
    """The dim order that makes ``x.permute(order)`` contiguous when ``x`` is dense but not
    contiguous (channels-last, transposed): the mask then follows memory order and the output
    keeps ``x``'s strides, as torch's. None when ``x`` is contiguous or not dense (then the
    logical order of a contiguous copy is used)."""
    if x.is_contiguous():
        return None
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))
    return order if x.permute(order).is_contiguous() else None


def _inverse(order: Tuple[int, ...]) -> Tuple[int, ...]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return tuple(inv)


def _forward_cpu(
    x: Tensor, keys: Tensor, p: float, out: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Output ``x * noise`` (into ``out`` if given: contiguous, ``x``'s shape and dtype,
    possibly ``x`` itself) and the packed 1-bit mask, for a CPU tensor."""
    k0, k1 = (int(k) for k in keys.tolist())
    thr, n = keep_threshold(p), x.numel()
    scale = _scale(p, x.dtype)
    lib = library() if x.dtype in _C_NAMES else None
    if lib is not None:
        xc = x.contiguous()
        if out is None:
            out = torch.empty(x.shape, dtype=x.dtype)
        packed = torch.empty(packed_nbytes(n, 1), dtype=torch.uint8)
        fn = getattr(lib, f"fewbit_dropout_fwd_{_C_NAMES[x.dtype]}")
        fn(xc.data_ptr(), n, k0, k1, thr, scale.item(), out.data_ptr(), packed.data_ptr())
        return out, packed
    keep = torch.empty(n, dtype=torch.bool)
    for start in range(0, n, _EAGER_CHUNK):
        stop = min(n, start + _EAGER_CHUNK)
        keep[start:stop] = keep_mask(start, stop, k0, k1, thr)
    noise = torch.where(keep.view(x.shape), scale, torch.zeros((), dtype=x.dtype))
    if out is None:
        out = x * noise
    else:
        torch.mul(x, noise, out=out)
    return out, pack(keep.view(torch.uint8), 1)


def _backward_cpu(grad: Tensor, packed: Tensor, p: float) -> Tensor:
    """``grad * noise`` with the noise rebuilt from the packed mask, for a CPU tensor."""
    n = grad.numel()
    lib = library() if grad.dtype in _C_NAMES else None
    if lib is not None:
        g = grad.contiguous()
        out = torch.empty(grad.shape, dtype=grad.dtype)
        fn = getattr(lib, f"fewbit_dropout_bwd_{_C_NAMES[grad.dtype]}")
        fn(packed.data_ptr(), n, g.data_ptr(), _scale(p, grad.dtype).item(), out.data_ptr())
        return out
    noise = unpack(packed, 1, n).view(grad.shape).to(grad.dtype)
    noise.div_(1 - p)
    return grad * noise


# The CPU passes as custom ops while torch.compile traces (ctypes calls cannot be traced).
@torch.library.custom_op("fewbit::dropout_forward", mutates_args=())
def _forward_op(x: Tensor, keys: Tensor, p: float) -> tuple[Tensor, Tensor]:
    return _forward_cpu(x, keys, p)


@_forward_op.register_fake
def _(x: Tensor, keys: Tensor, p: float) -> tuple[Tensor, Tensor]:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, x.new_empty(packed_nbytes(x.numel(), 1), dtype=torch.uint8)


@torch.library.custom_op("fewbit::dropout_backward", mutates_args=())
def _backward_op(grad: Tensor, packed: Tensor, p: float) -> Tensor:
    return _backward_cpu(grad, packed, p)


@_backward_op.register_fake
def _(grad: Tensor, packed: Tensor, p: float) -> Tensor:
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _hashed_forward(
    x: Tensor, keys: Tensor, p: float, out: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """The CPU forward pass (:func:`_forward_cpu`): through its custom op while torch.compile
    traces (a ctypes call cannot be traced; ``out`` is then not used), else directly."""
    if torch.compiler.is_compiling():
        return _forward_op(x, keys, p)
    return _forward_cpu(x, keys, p, out)


def _hashed_backward(grad: Tensor, packed: Tensor, p: float) -> Tensor:
    """The CPU backward pass (:func:`_backward_cpu`), through its custom op while tracing."""
    if torch.compiler.is_compiling():
        return _backward_op(grad, packed, p)
    return _backward_cpu(grad, packed, p)


def _drawn_noise(
    x: Tensor, p: float, generator: Optional[torch.Generator]
) -> Tuple[Tensor, PackedCodes]:
    """Other devices: torch's draws, ``noise = bernoulli(1 - p) / (1 - p)`` (contiguous, x's
    dtype), and the keep-mask as 1-bit uint8 codes (decoded straight to 0/1 bytes: no bool
    conversion pass)."""
    noise = torch.empty_like(x, memory_format=torch.contiguous_format)
    noise.bernoulli_(1 - p, generator=generator)
    mask = BitPacker(1).encode(noise.ne(0).view(torch.uint8))
    noise.div_(1 - p)
    return noise, mask


def _mask_noise(mask: PackedCodes, p: float, dtype: torch.dtype) -> Tensor:
    """``noise = keep / (1 - p)`` in ``dtype`` from a packed keep-mask (other devices)."""
    noise = mask.decode().to(dtype)
    return noise.div_(1 - p)


def dropout_with_mask(
    x: Tensor, p: float, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, PackedCodes]:
    """``x * noise`` and its 1-bit keep-mask (a bool :class:`PackedCodes` of ``x``'s shape, in
    the logical order of ``x``), for callers that fuse dropout into their own autograd
    Function (the compressed attention). Same mask and arithmetic as :func:`dropout`'s
    forward on a contiguous tensor: the hashed C pass on the CPU, torch's draws elsewhere;
    ``0 < p < 1``."""
    if x.device.type == "cpu":
        xc = x.contiguous()
        out, packed = _hashed_forward(xc, _draw_keys(generator), p)
        return out, PackedCodes(packed, 1, xc.shape, torch.bool)
    noise, mask = _drawn_noise(x, p, generator)
    return x * noise, PackedCodes(mask.packed, 1, mask.shape, torch.bool)


def apply_mask(t: Tensor, mask: PackedCodes, p: float) -> Tensor:
    """``t * noise`` for a mask from :func:`dropout_with_mask` (``t`` of the mask's shape):
    the dropped-out copy of ``t`` in torch's arithmetic (one C pass on the CPU)."""
    if t.device.type == "cpu":
        return _hashed_backward(t.contiguous(), mask.packed, p)
    return t * _mask_noise(mask, p, t.dtype)


class _Dropout(torch.autograd.Function):
    """``x * mask / (1 - p)``; saves the mask packed at 1 bit per element."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, p: float, inplace: bool, generator: Optional[torch.Generator]
    ) -> Tensor:
        ctx.p = p  # type: ignore[attr-defined]
        ctx.hashed = x.device.type == "cpu"  # type: ignore[attr-defined]
        if ctx.hashed:  # type: ignore[attr-defined]
            keys = _draw_keys(generator)
            perm = _memory_order(x)
            ctx.perm = perm  # type: ignore[attr-defined]
            xm = x.permute(perm) if perm is not None else x  # memory order, no copy
            direct = inplace and xm.is_contiguous()
            out_m, packed = _hashed_forward(xm, keys, p, xm if direct else None)
            out = out_m.permute(_inverse(perm)) if perm is not None else out_m  # x's strides
            if not torch.compiler.is_compiling():  # a trace cannot set Python attributes
                packed = mark_compact(packed)  # the generic mode leaves it alone
            ctx.save_for_backward(packed)
            if not inplace:
                return out
            ctx.mark_dirty(x)
            return x if out_m is xm else x.copy_(out)
        noise, mask = _drawn_noise(x, p, generator)
        save_encoded(ctx, mask)
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        if ctx.hashed:
            (packed,) = ctx.saved_tensors
            perm = ctx.perm
            gm = grad.permute(perm) if perm is not None else grad  # the forward's order
            gx = _hashed_backward(gm, packed, ctx.p)
            return gx.permute(_inverse(perm)) if perm is not None else gx, None, None, None
        (mask,), _ = load_encoded(ctx)
        assert isinstance(mask, PackedCodes)
        return grad * _mask_noise(mask, ctx.p, grad.dtype), None, None, None


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Drop-in ``F.dropout`` saving a 1-bit mask (``ceil(n/8)`` bytes) for backward.

    Output ``x * mask / (1 - p)`` with ``mask`` keeping each element with probability
    ``1 - p`` (within ``2**-25``; see the module docs), in torch's arithmetic; identity when
    not ``training`` or ``p == 0``; zeros when ``p == 1``. On the CPU the mask comes from a
    counter hash keyed by two integers drawn from ``generator`` (default: torch's CPU
    generator): the same seed gives the same mask, but not the numbers torch's own dropout
    draws. Gradients are ``grad * mask / (1 - p)`` exactly, on the same mask.
    """
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0 or input.numel() == 0:
        return input
    if p == 1:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input * zero
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating tensor, got {input.dtype}")
    if inplace and torch.compiler.is_compiling():
        # A traced autograd Function cannot return a dirty input: out of place, then copied.
        return input.copy_(_Dropout.apply(input, float(p), False, generator))
    return _Dropout.apply(input, float(p), bool(inplace), generator)
