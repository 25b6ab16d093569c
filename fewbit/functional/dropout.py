"""Dropout that saves its keep-mask at 1 bit per element (lossless).

:func:`dropout` stores ``ceil(n / 8)`` bytes for backward (a :class:`MaskPacker` code) instead
of torch's ``n``-element noise tensor in the input dtype (the CPU keeps it as float32: 32x).
Gradients are bitwise torch's.

Passes over ``n`` elements on the CPU: forward draws the noise as torch does (one write),
then one fused pass (``torch.compile`` of plain torch ops via :func:`fewbit.codecs.fused.fused`,
from ``FUSED_MIN`` elements, contiguous tensors, ``n % 8 == 0``) reads ``x`` and the noise
and writes the output and the packed mask; backward is one fused pass reading the gradient
and the mask. Outputs and gradients are bitwise the eager path's and torch's. Otherwise
(eager): forward turns the noise into the mask, scales it, multiplies and packs the mask
(:class:`~fewbit.codecs.protocol.BitPacker`); backward unpacks the mask to bytes, converts
them to the gradient's dtype, scales and multiplies.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..codecs.fused import compile_enabled, fused
from ..codecs.protocol import BitPacker, PackedCodes
from .saved import load_encoded, save_encoded

__all__ = ["dropout"]

# Fused (compiled, one pass) CPU path from this many elements on; smaller tensors run eagerly
# (compiling costs seconds once; Inductor caches it on disk).
FUSED_MIN = 1 << 16


def _forward_flat(x: Tensor, noise: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """``x * noise`` (noise in {0, scale}) and the 1-bit keep-mask packed, flat, ``n % 8 == 0``.

    Written as plain elementwise torch ops so that ``torch.compile`` makes one loop of it.
    """
    keep = (noise != 0).reshape(-1, 8).to(torch.uint8)
    packed = keep[:, 0]
    for k in range(1, 8):
        packed = packed | (keep[:, k] << k)
    out = x * torch.where(noise != 0, scale, torch.zeros_like(scale))
    return out, packed


def _backward_flat(grad: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
    """``grad * noise`` with noise rebuilt from the packed mask (flat, ``n % 8 == 0``)."""
    i = torch.arange(grad.numel(), device=grad.device)
    bits = (packed[i // 8] >> (i % 8).to(torch.uint8)) & 1
    return grad * torch.where(bits != 0, scale, torch.zeros_like(scale))


_forward_fused = fused(_forward_flat)
_backward_fused = fused(_backward_flat)


def _use_fused(*tensors: Tensor) -> bool:
    t = tensors[0]
    return (
        t.device.type == "cpu"
        and compile_enabled()
        and FUSED_MIN <= t.numel()
        and t.numel() % 8 == 0
        and all(u.is_contiguous() for u in tensors)
    )


def _scale(p: float, dtype: torch.dtype) -> Tensor:
    """``1 / (1 - p)`` rounded as torch's dropout rounds it (``ones.div_(1 - p)``)."""
    return torch.ones((), dtype=dtype).div_(1 - p)


class _Dropout(torch.autograd.Function):
    """``x * mask / (1 - p)``; saves the mask packed at 1 bit per element."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, p: float, inplace: bool, generator: Optional[torch.Generator]
    ) -> Tensor:
        # Same draws and arithmetic as torch's non-fused dropout: noise = bernoulli(1-p)/(1-p).
        noise = torch.empty_like(x, memory_format=torch.contiguous_format)
        noise.bernoulli_(1 - p, generator=generator)
        ctx.p = p  # type: ignore[attr-defined]
        if not inplace and _use_fused(x, noise):
            # One compiled pass: output and packed mask from x and the noise.
            out, packed = _forward_fused(x.reshape(-1), noise.reshape(-1), _scale(p, x.dtype))
            save_encoded(ctx, PackedCodes(packed, 1, x.shape, torch.uint8))
            return out.reshape(x.shape)
        mask = noise.ne(0)
        noise.div_(1 - p)
        # Encoded as 1-bit uint8 codes: backward decodes them straight to 0/1 bytes (no bool
        # conversion pass) and converts once to the gradient's dtype.
        save_encoded(ctx, BitPacker(1).encode(mask.view(torch.uint8)))
        del mask
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        (mask,), _ = load_encoded(ctx)
        assert isinstance(mask, PackedCodes)
        if _use_fused(grad, mask.packed):
            scale = _scale(ctx.p, grad.dtype)
            return _backward_fused(grad.reshape(-1), mask.packed, scale).reshape(grad.shape), \
                None, None, None
        noise = mask.decode().to(grad.dtype)
        noise.div_(1 - ctx.p)
        return grad * noise, None, None, None


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Drop-in ``F.dropout`` saving a 1-bit mask (``ceil(n/8)`` bytes) for backward.

    Output ``x * mask / (1 - p)`` with ``mask ~ Bernoulli(1 - p)``; identity when not
    ``training`` or ``p == 0``; zeros when ``p == 1``. On CPU the mask is drawn exactly as
    ``torch.nn.functional.dropout`` draws it, so the same seed gives the same output.
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
    return _Dropout.apply(input, float(p), bool(inplace), generator)
