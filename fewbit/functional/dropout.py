"""Dropout that saves its keep-mask at 1 bit per element (lossless).

:func:`dropout` stores ``ceil(n / 8)`` bytes for backward (a :class:`MaskPacker` code) instead
of torch's ``n``-element noise tensor in the input dtype (the CPU keeps it as float32: 32x).
Gradients are bitwise torch's.

Passes over ``n`` elements (CPU, eager): forward draws the noise (write), turns it into the
mask (read/write), scales it (read/write), multiplies (read x, write y) and packs the mask
(:class:`~fewbit.codecs.protocol.BitPacker`); backward unpacks the mask to bytes, converts
them to the gradient's dtype, scales and multiplies (before: one more pass, bytes -> bool).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from ..codecs.protocol import BitPacker
from .saved import load_encoded, save_encoded

__all__ = ["dropout"]


class _Dropout(torch.autograd.Function):
    """``x * mask / (1 - p)``; saves the mask packed at 1 bit per element."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, p: float, inplace: bool, generator: Optional[torch.Generator]
    ) -> Tensor:
        # Same draws and arithmetic as torch's non-fused dropout: noise = bernoulli(1-p)/(1-p).
        noise = torch.empty_like(x, memory_format=torch.contiguous_format)
        noise.bernoulli_(1 - p, generator=generator)
        mask = noise.ne(0)
        noise.div_(1 - p)
        ctx.p = p  # type: ignore[attr-defined]
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
        assert mask is not None
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
